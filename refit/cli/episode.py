"""``refit episode ...``: the drift episodes a person may want to see or end."""

from __future__ import annotations

from typing import Annotated

import typer

from refit.cli.common import JsonOption, ModelNameOption, StoreOption, _emit, _prepare, app
from refit.errors import RefitError

episode_app = typer.Typer(help="Drift episodes: a detected drift, followed across windows until an update "
                               "trained on it is promoted.", no_args_is_help=True)
app.add_typer(episode_app, name="episode")


@episode_app.command("close")
def close(reason: Annotated[str, typer.Option(help="Why; recorded on the episode in MLflow.")],
          model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Close the model's open drift episode by hand (a false alarm, a change nobody needs learned).

    Its labels are kept: an update of a later episode still learns from them.

    Example: refit episode close --model-name support-intents --reason "marketing campaign, not drift"
    """
    settings = _prepare(store, model_name)
    if not reason.strip():
        raise RefitError("--reason must say why the episode is closed")
    from registry import episodes
    from registry.tracking import configure

    experiment_id = configure(settings)
    episode = episodes.open_episode(experiment_id, settings.model_name)
    if episode is None:
        raise RefitError(f"model {settings.model_name} has no open drift episode")
    closed = episodes.close(episode.id, reason.strip(), "person")
    _emit(closed.to_dict() | {"model_name": settings.model_name}, as_json, f"Episode of {settings.model_name}")


@episode_app.command("list")
def list_episodes(model_name: ModelNameOption = None, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """The model's drift episodes, newest first.

    Example: refit episode list --model-name support-intents --json
    """
    import json

    settings = _prepare(store, model_name)
    from registry import episodes
    from registry.tracking import configure

    found = [e.to_dict() for e in episodes.episodes(configure(settings), settings.model_name)]
    if as_json:
        print(json.dumps({"model_name": settings.model_name, "episodes": found}))
        return
    for e in found:
        _emit(e, False, f"Episode {e['episode']}")
