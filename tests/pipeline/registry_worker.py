"""Run by tests in real subprocesses: concurrent registration/promotion, and a build that gets killed."""

import sys
import time

from pipeline import config
from pipeline.registry import Registry


def main() -> None:
    mode, home = sys.argv[1], sys.argv[2]
    registry = Registry.open(config.load({"home": home}, env={}))
    if mode == "hammer":
        tag = sys.argv[3]
        for i in range(int(sys.argv[4])):
            art = registry.build("model", "segnet", entry_point="tests:hammer", config={"tag": tag, "i": i},
                                 builder=lambda staging, _rec: None)
            registry.set_blessing(art.id, True, ["test"])
            registry.promote(art.id, "perception", "segnet")
    elif mode == "killed-build":
        def builder(staging, _record):
            with open(f"{staging}/part-0", "w") as fh:
                fh.write("half of a dataset")
            print("STARTED", flush=True)
            time.sleep(600)

        registry.build("dataset", "victim", entry_point="tests:killed", config={"n": 1}, builder=builder)


if __name__ == "__main__":
    main()
