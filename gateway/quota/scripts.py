"""The Lua scripts of the Redis store, as sent: those that record usage carry the
shared prelude (usage_event.lua), the check its argument layout's names first."""

from __future__ import annotations

from importlib import resources

from gateway.quota import script_args


def _lua(name: str, *, records: bool = True) -> str:
    """A script's source; those that record usage get the shared prelude first."""
    source = resources.files("gateway.quota").joinpath(name).read_text()
    return _lua_prelude() + source if records else source


def _lua_prelude() -> str:
    return resources.files("gateway.quota").joinpath("usage_event.lua").read_text()


# Its argument layout's names first: they come from the table Python encodes by.
SCRIPT = script_args.lua_names() + _lua("check_and_charge.lua")
APPLY_ONCE = _lua("apply_once.lua")
RESTORE = _lua("restore.lua", records=False)
SET_LEVEL = _lua("set_level.lua")
