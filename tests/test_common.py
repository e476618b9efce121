"""The shared helpers' formatting of counts and sizes."""

import pytest

from pocketgpt.common import human, human_bytes


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (999.4, "999"), (999.6, "1K"), (1000, "1K"), (1234567, "1.23M"),
    (999_999, "1M"), (5_870_000, "5.87M"), (1.13e9, "1.13B"), (-2500, "-2.5K"),
])
def test_human_counts(n, text):
    assert human(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (1024**2 - 1, "1.0 MiB"),
    (68 * 1024**2, "68.0 MiB"), (1_130_000_000, "1.1 GiB"), (3 * 1024**4, "3.0 TiB"), (2 * 1024**5, "2.0 PiB"),
])
def test_human_bytes_has_one_unit(n, text):
    assert human_bytes(n) == text
