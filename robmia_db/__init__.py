"""robmia-db: a declarative experiment database for membership inference against robust models.

Layers (each may import only those before it): errors -> spec -> store -> runner (the only torch user)
-> attacks -> report; `cli` imports the others lazily inside each command.
"""

from __future__ import annotations

from robmia_db.api import Store, open_store

__all__ = ["Store", "open_store"]
__version__ = "0.1.0"
