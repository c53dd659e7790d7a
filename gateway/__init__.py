"""MCP authorization gateway."""

__version__ = "0.1.0"
