"""PySpark jobs: landing, cleaning and feature engineering.

Transforms are pure ``DataFrame -> DataFrame`` functions; a Spark session is created only in
the entry points (:mod:`spark_jobs.jobs`), which run in-process or under ``spark-submit``.
"""
