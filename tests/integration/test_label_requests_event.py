"""`refit labels import` announces kept labels (``refit.labels.arrived``) to a real Prefect API, and only to one.

Against the session's temporary Prefect API (``prefect_test_harness``); the
event is read back from it by name and resource.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from refit.cli.labels import LABELS_EVENT, _announce


def test_import_announces_kept_labels_only_where_an_api_is_named(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
    from prefect.settings import get_current_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert _announce("imported-model", 3) == "not sent: PREFECT_API_URL is not set"
    monkeypatch.setenv("PREFECT_API_URL", get_current_settings().api.url)
    assert _announce("imported-model", 0) == "not sent: no label kept"
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    assert _announce("imported-model", 3) == "sent"
    where = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(name=[LABELS_EVENT]),
                        resource=EventResourceFilter(id=["refit.model.imported-model"]))
    with get_client(sync_client=True) as client:
        found, deadline = [], time.monotonic() + 30
        while not found and time.monotonic() < deadline:
            found = client.read_events(where, limit=10).events
            time.sleep(0.2)
    assert [e.payload for e in found] == [{"model_name": "imported-model", "labels": 3}]
