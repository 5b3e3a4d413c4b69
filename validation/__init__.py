"""Great Expectations checks on raw data and engineered features; a failed suite halts the DAG."""
