"""``sample``: a random observed value, drawn on the workers from the variable's sample pool.

There is nothing to fit: the workers impute from the pool the order carries.
"""

from __future__ import annotations

from typing import Any

from dmice.models.base import BaseModel


class SampleModel(BaseModel):
    """``sample`` for one incomplete variable: no statistics, the pool in every order."""

    def order(self, iteration: int) -> dict[str, Any]:
        o = super().order(iteration)
        o["values"] = self.sample_pool
        return o
