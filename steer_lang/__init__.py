"""The `.steer` language: text programs compiled to the steering core's program objects.

    script = steer_lang.Script.from_file("examples/short_words.steer")
    posterior = script.run(particles=8)            # the file's sampler settings, overridden

`parse` gives the typed AST, `check` reports every problem with its line and column, and `Script`
builds `steer.Program` objects that run on the same samplers as hand-written Python programs.
"""

from . import ast
from .checker import check
from .errors import Diagnostic, LangError
from .interpreter import ScriptProgram
from .parser import parse
from .script import Script

__all__ = ["Diagnostic", "LangError", "Script", "ScriptProgram", "ast", "check", "parse"]
