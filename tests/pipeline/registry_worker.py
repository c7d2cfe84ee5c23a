"""Run by tests in real subprocesses: concurrent registration/promotion, and builds that get killed or frozen.

    python -m tests.pipeline.registry_worker MODE HOME REGISTRY_URL [ARGS...]

An empty REGISTRY_URL means the home's SQLite registry; ``AVP_REGISTRY__*`` variables set the lease.
"""

import os
import sys
import time

from pipeline import config
from pipeline.registry import Registry


def main() -> None:
    mode, home, url = sys.argv[1:4]
    registry = Registry.open(config.load({"home": home, "registry_url": url}))
    if mode == "hammer":
        tag = sys.argv[4]
        for i in range(int(sys.argv[5])):
            art = registry.build("model", "segnet", entry_point="tests:hammer", config={"tag": tag, "i": i},
                                 builder=lambda staging, _rec: None)
            registry.set_blessing(art.id, True, ["test"])
            registry.promote(art.id, "perception", "segnet")
    elif mode in ("killed-build", "held-build"):
        go = sys.argv[4] if mode == "held-build" else None

        def builder(staging, _record):
            with open(f"{staging}/part-0", "w") as fh:
                fh.write("half of a dataset")
            print("STARTED", flush=True)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not (go and os.path.exists(go)):
                time.sleep(0.05)

        registry.build("dataset", "victim", entry_point="tests:killed", config={"n": 1}, builder=builder)


if __name__ == "__main__":
    main()
