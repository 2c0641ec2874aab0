"""Names of the Prefect events refit sends, shared by every sender so that ``prefect.yaml``'s triggers match them.

A plain constant module: the server (which posts events over HTTP) and the
CLI (which posts them with Prefect's client) import it without loading
either Prefect or pandas.
"""

LABELS_EVENT = "refit.labels.arrived"  # labels were kept: the update deployment checks whether the episode's suffice
