"""The route table's path lookup (gateway/routes.py): the longest route path that is the request path
or a '/'-bounded prefix of it wins, whatever the table's size or order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import RouteConfig
from gateway.routes import RouteTable

PATHS = ("/a/mcp", "/a/mcp/deep", "/b", "/bb/mcp", "/team-01/mcp", "/team-10/mcp", "/x/y/z")
TABLE = RouteTable(
    tuple(RouteConfig(f"r{i}", path, "http://127.0.0.1:9/mcp", "https://gw" + path) for i, path in enumerate(PATHS))
)
SEGMENTS = st.sampled_from(["a", "b", "bb", "mcp", "deep", "team-01", "team-10", "x", "y", "z", "", "mcpx"])


def longest_prefix(path: str) -> tuple[str, str] | None:
    """The definition: the longest route path equal to ``path`` or followed in it by '/'."""
    matches = [p for p in PATHS if path == p or path.startswith(p + "/")]
    if not matches:
        return None
    best = max(matches, key=len)
    return best, path[len(best) :]


@settings(max_examples=500, deadline=None)
@given(segments=st.lists(SEGMENTS, max_size=6))
def test_match_path_is_the_longest_bounded_prefix(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    found = TABLE.match_path(path)
    assert (None if found is None else (found[0].path, found[1])) == longest_prefix(path)


def test_match_path_examples() -> None:
    assert TABLE.match_path("/a/mcp/deeper") is not None and TABLE.match_path("/a/mcp/deeper")[1] == "/deeper"
    assert TABLE.match_path("/a/mcp/deep/x")[0].path == "/a/mcp/deep"  # type: ignore[index]
    assert TABLE.match_path("/bb") is None
    assert TABLE.match_path("/a/mcpx") is None
    assert TABLE.match_path("/b/") == (TABLE.by_name("r2"), "/")
