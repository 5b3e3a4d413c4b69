"""The intraday update on one day of real Instacart events, through the real Airflow scheduler.

After the nightly run of ``--ds`` (``bash scripts/demo.sh 2025-12-16``), the source's events of
the next day are the day the champion has not seen: ``land`` copied them into the lake's raw
partition of ``--ds`` and ``clean`` held them back as not yet due. They are streamed as the
service appends accepted batches (pseudonymous ids, one entry per basket), then the
``intraday_update`` DAG runs through a real Airflow scheduler (``cli.airflow_run``, as ``make
demo``) for the window ending at the next midnight, with the DAG's default Params (the last
hour judged). Printed: the DAG's wall time and each task's, the events, the purchases
learnt from, the judged users and the gate's word, the challenger.

A rerun appends nothing: events already streamed (the stream holds an entry) are not
streamed again, and the DAG run of the hour is replaced.

``python -m benchmarks.intraday [--ds 2025-12-16]``
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import date, timedelta

import pandas as pd

from shopml import schema as S
from shopml.config import Settings, load_settings
from shopml.stream import stream_of


def next_day_events(settings: Settings, ds: date) -> pd.DataFrame:
    """The source's events of ``ds + 1`` as ``land`` wrote them (pseudonymous ids)."""
    day = ds + timedelta(days=1)
    path = settings.paths.raw_events_for(ds) / f"{S.EVENT_DATE}={day.isoformat()}"
    if not path.exists():
        raise SystemExit(f"no source events on {day} in {path}: run the nightly for an earlier ds")
    events = pd.read_parquet(path)
    events[S.TIMESTAMP] = pd.to_datetime(events[S.TIMESTAMP], utc=True)
    return events.sort_values(S.TIMESTAMP, kind="stable")


def stream_day(settings: Settings, events: pd.DataFrame) -> int:
    """Append the day to the stream, one entry per basket; 0 when it holds entries already."""
    stream = stream_of(settings)
    if stream.last_id() is not None:
        print("the stream holds entries already: nothing appended", flush=True)
        return 0
    entries = 0
    for _, basket in events.groupby(S.SESSION_ID, sort=False):
        stream.append([
            {S.USER_ID: str(r[S.USER_ID]), S.ITEM_ID: str(r[S.ITEM_ID]),
             S.EVENT_TYPE: str(r[S.EVENT_TYPE]), S.SESSION_ID: str(r[S.SESSION_ID]),
             S.QUERY: None, S.TIMESTAMP: int(r[S.TIMESTAMP].timestamp() * 1_000_000)}
            for r in basket.to_dict("records")
        ])  # fmt: skip
        entries += 1
    return entries


def main() -> None:
    from training import intraday

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds", default="2025-12-16", help="the nightly run's logical date")
    args = p.parse_args()
    settings = load_settings()
    ds = date.fromisoformat(args.ds)
    events = next_day_events(settings, ds)
    entries = stream_day(settings, events)
    print(f"{ds + timedelta(days=1)}: {len(events)} events, {events[S.SESSION_ID].nunique()} "
          f"baskets, {events[S.USER_ID].nunique()} users; {entries} stream entries appended",
          flush=True)  # fmt: skip
    logical = ds + timedelta(days=2)  # the hour ending at the next midnight
    started = time.perf_counter()
    # the real scheduler, as `make demo` runs the nightly DAG (cli/airflow_run.py)
    run = subprocess.run(
        [sys.executable, "-m", "cli.airflow_run", "--ds", logical.isoformat(),
         "--dag", "intraday_update", "--show", "warm_start", "register_challenger"],
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    print(run.stdout[-6000:])
    if run.returncode != 0:
        raise SystemExit(f"the DAG run failed:\n{run.stderr[-3000:]}")
    table = [line.split() for line in run.stdout.splitlines()
             if len(line.split()) == 3 and line.split()[1] in ("success", "skipped")]  # fmt: skip
    tasks = sum(float(seconds) for _, _, seconds in table)
    dag = re.search(r"state=success, (\d+) s", run.stdout)
    print(f"DAG run: {dag.group(1) if dag else '?'} s (Airflow's start -> end); task durations "
          f"sum to {tasks:.0f} s; {wall:.0f} s including the scheduler's start")  # fmt: skip
    run_dir = settings.paths.intraday_run(intraday.utc(f"{logical.isoformat()}T00:00:00"))
    for name in ("window.json", "warm_start.json", "challenger.json"):
        if (run_dir / name).exists():
            print(f"{name}: {json.dumps(json.loads((run_dir / name).read_text()), indent=1)}")


if __name__ == "__main__":
    main()
