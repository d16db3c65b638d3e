"""Stand-in trainer where rank 1 crashes at once and every other rank hangs for SLEEP_S seconds,
as a rank stuck in a collective would: the launcher must tear the hung ranks down promptly."""

import os
import sys
import time

if __name__ == "__main__":
    if os.environ["RANK"] == "1":
        print("rank 1: simulated crash", flush=True)
        sys.exit(1)
    time.sleep(float(os.environ.get("SLEEP_S", "300")))
