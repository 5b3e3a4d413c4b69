# ShopML. `make demo` runs the nightly pipeline; `make test` runs the test suite.
.PHONY: install demo demo-search bench-search bench-compression bench-chaos bench-freshness bench-session bench-intraday bench-features bench-scale capacity test test-fast lint format lock serve bench-serving airflow-ui mlflow-ui clean tools image prod-demo prod-clean

install:  ## Create .venv: torch CPU, locked deps, Horovod (cached wheel), shopml
	bash scripts/setup.sh

demo: install  ## Nightly DAG on the embedded profile, real Instacart data (a real Airflow scheduler)
	bash scripts/demo.sh

demo-search: install  ## Search DAG on the real Women's Clothing reviews (MiniLM, BM25, compression, gate), then its benchmarks
	bash scripts/demo_search.sh

test: install  ## The whole test suite (what .ci/run calls)
	. scripts/env.sh && .venv/bin/ruff check . && .venv/bin/lint-imports && .venv/bin/pytest

test-fast:  ## Unit tests only, no end-to-end DAG run
	. scripts/env.sh && .venv/bin/pytest -m "not integration"

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

lock:  ## Re-resolve requirements.in into requirements.lock (torch/horovod excluded)
	.venv/bin/uv pip compile requirements.in --python .venv/bin/python -o requirements.lock

serve:  ## Serve the champion on http://127.0.0.1:8000
	. scripts/env.sh && shopml serve

bench-serving:  ## Load benchmark of `shopml serve`: 100k-item catalog, open-loop load at 100/300/500 rps
	. scripts/env.sh && python -m benchmarks.serving

bench-chaos:  ## Faults under load (own Redis and PostgreSQL: Redis down, registry unreachable, alias swap, worker killed) and a 10-minute soak
	. scripts/env.sh && python -m benchmarks.chaos

bench-freshness:  ## POST /events -> online store -> next answer at 100 events/s beside 300 requests/s (the bench-serving deployment)
	. scripts/env.sh && python -m benchmarks.freshness

bench-intraday:  ## The intraday_update DAG (Airflow) on the next day of Instacart events after `scripts/demo.sh 2025-12-16`
	. scripts/env.sh && python -m benchmarks.intraday

bench-features:  ## The Spark feature job vs its DuckDB peer on synthetic logs of 10^6 and 10^7 events (equal rows, timed side by side)
	. scripts/env.sh && python -m benchmarks.spark_features --sizes 1000000 10000000

bench-scale:  ## Every nightly stage as its own process at 10^5 and 10^6 synthetic events (~40 min): time, peak memory, exponents (var/scale.json; 10^7 by hand with --events 10000000 and SHOPML_EVAL__MAX_USERS=10000: about 65 min)
	. scripts/env.sh && mkdir -p var && python -m benchmarks.scale --events 100000 1000000 --json var/scale.json

capacity:  ## docs/capacity.md from `make bench-scale`'s per-event costs and Redis bytes measured through Feast
	. scripts/env.sh && python -m benchmarks.capacity --scale var/scale.json --out docs/capacity.md

bench-session:  ## Session replay on the last demo run: the rest of each held-out basket after its first 1-3 items, stale vs fresh session
	. scripts/env.sh && python -m benchmarks.session_replay

bench-search:  ## The search benchmark table (CIs, ratios) and /search latency of the last search run
	. scripts/env.sh && python -m benchmarks.search

bench-compression:  ## Teacher and compressed candidates side by side (search cross-encoder, recommender ranker)
	. scripts/env.sh && python -m benchmarks.compression

airflow-ui:  ## Airflow UI on http://127.0.0.1:8080 over the demo's state (no login on loopback)
	. scripts/env.sh && python -m cli.airflow_run --port 8080

mlflow-ui:  ## MLflow UI on http://127.0.0.1:5000 over the demo's state
	. scripts/env.sh && mlflow ui --backend-store-uri "sqlite:///$$SHOPML_HOME/mlflow/mlflow.db" --port 5000

prod-demo:  ## Nightly DAG on the production profile: this machine's PostgreSQL + Redis
	bash scripts/prod_demo.sh

prod-clean:  ## Drop the production demo's databases, Redis keys and var/prod
	bash scripts/prod_demo.sh --clean

tools:  ## helm for the chart tests (cached in ~/.cache/shopml/tools)
	bash scripts/fetch_tools.sh

image:  ## Build the platform image (needs a Docker engine)
	docker build -t shopml:0.1.0 .

clean:  ## Remove pipeline state (var/), keep the venv
	rm -rf var
