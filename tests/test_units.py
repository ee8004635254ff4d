import pytest

from bsplan.planning.errors import BadInput
from bsplan.planning.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("300MiB", 300 * 2**20), ("2GiB", 2 * 2**30), ("2GB", 2 * 10**9), ("1048576", 2**20), ("1.5 GiB", 3 * 2**29),
     ("64mib", 64 * 2**20), ("1e9", 10**9), ("512k", 512_000)],
)
def test_parse_size_reads_decimal_binary_and_plain_bytes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5MiB", "0", "MiB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(BadInput, match="memory size"):
        parse_size(text)


def test_format_bytes_uses_binary_units() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(300 * 2**20) == "300 MiB"
    assert format_bytes(1.5 * 2**30) == "1.5 GiB"
    assert format_bytes(None) == "-"
