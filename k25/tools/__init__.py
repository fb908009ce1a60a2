"""Tools the model calls: the interface (`Tool`, `Toolset`, `ToolResult`) and the sandboxed Python tool."""

from k25.tools.base import Tool, ToolResult, Toolset
from k25.tools.python import PythonSandbox, PythonTool, SandboxStartError

__all__ = ["PythonSandbox", "PythonTool", "SandboxStartError", "Tool", "ToolResult", "Toolset"]
