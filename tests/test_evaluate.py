"""The nightly evaluation table: one row per name, refused before any work."""

import pytest

from training.evaluate import check_unique_names, evaluate_run


def test_two_rows_with_one_name_are_refused_before_anything_is_read(tmp_path):
    missing = tmp_path / "no-run-here"  # reading it would fail differently
    with pytest.raises(ValueError, match=r"unique names; \['two_tower'\] would appear twice"):
        evaluate_run(missing, 10, {"two_tower": None}, zoo={"two_tower": ("two_tower", {})})
    check_unique_names(["popularity", "two_tower", "two_stage"])  # distinct names pass
