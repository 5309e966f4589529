"""The base of every config section: unknown keys refused, values frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    # Strict: "8080" is not a port nor "yes" a boolean, as the JSON Schema says;
    # the looser YAML spellings the loader does take are converted by the types.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
