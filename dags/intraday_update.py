"""
### ShopML intraday update

Every hour, the champion's two-tower is warm-started on the purchases streamed through
`POST /events` since its data ended (a few epochs of the same Horovod loop, at a fraction of
the nightly learning rate), judged against the champion on the most recent hours (the same
served path and promotion gate as the nightly run), and registered as an MLflow version. The
`challenger` alias moves to it unless the judged hours say it is worse; serving then sends
`serving.challenger_share` of users to it. The next nightly run decides whether it becomes
the champion or is retired.

Nothing is trained when there is no champion or no new purchase: the run is skipped, with the
reason in the task log. Every task reads and writes `runs/intraday/until=<end>/`, so a rerun of
an hour recomputes it. Each run is also `shopml intraday --until <end>`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, chain, dag, task


def _environment():
    """The Settings of the environment (pydantic only: no engine is touched at parse time)."""
    from shopml.config import load_settings

    return load_settings()


_ENV = _environment()

PARAMS = {
    "until": Param(
        None,
        type=["null", "string"],
        format="date-time",
        title="Window end",
        description="The update learns from events stamped before this time (ISO-8601, UTC). "
        "Empty: the run's logical date (the top of the hour on a schedule).",
    ),
    "eval_hours": Param(
        _ENV.intraday.eval_hours,
        type="number",
        exclusiveMinimum=0,
        maximum=168,
        title="Judged hours",
        description="The most recent hours, held out: the update is judged against the "
        "champion on the purchases made in them.",
    ),
    "intraday_epochs": Param(
        _ENV.intraday.epochs,
        type="integer",
        minimum=1,
        maximum=50,
        title="Epochs",
        description="Passes over the new purchases, starting from the champion's weights.",
    ),
    "workers": Param(
        2,
        type="integer",
        minimum=1,
        maximum=64,
        title="Horovod workers",
        description="Processes started by horovodrun -np.",
    ),
    "promotion_margin": Param(
        0.0,
        type="number",
        minimum=0,
        maximum=1,
        title="Promotion margin",
        description="The gate's margin on the judged hours (as in nightly_retrain); its verdict "
        "is what the nightly run reads to promote the challenger.",
    ),
}


def _settings(params):
    from shopml.config import settings_from_params

    return settings_from_params(dict(params))


def _until(params, logical_date):
    from training.intraday import utc

    return utc(params["until"]) if params.get("until") else utc(logical_date)


def _or_skip(step, params, logical_date):
    """Run one step; no champion or nothing new to learn skips the rest of the run."""
    from airflow.exceptions import AirflowSkipException

    from training.intraday import NoChampion, NothingToLearn

    try:
        print(step(_settings(params), _until(params, logical_date)))
    except (NoChampion, NothingToLearn) as exc:
        raise AirflowSkipException(str(exc)) from exc


@dag(
    dag_id=Path(__file__).stem,
    # hourly, unless the nightly schedule is 'none' (the embedded demo: manual runs only)
    schedule=_ENV.intraday.schedule if _ENV.schedule else None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["shopml", "recommendation", "intraday"],
    params=PARAMS,
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
)
def intraday_update():
    @task
    def stream_window(logical_date=None, params=None):
        from training.intraday import stream_window as step

        _or_skip(step, params, logical_date)

    @task
    def warm_start(logical_date=None, params=None):
        from training.intraday import warm_start as step

        _or_skip(step, params, logical_date)

    @task
    def register_challenger(logical_date=None, params=None):
        from training.intraday import register_challenger as step

        print(step(_settings(params), _until(params, logical_date)))

    chain(stream_window(), warm_start(), register_challenger())


intraday_update()
