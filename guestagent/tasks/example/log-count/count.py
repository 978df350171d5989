"""count: one instance per part (BATCH_COMPUTE_DAG_INSTANCE_ID picks it).

Plain "LEVEL N" lines: the example image's python3 is python3-minimal (no json module).
"""

import os

import conf

instance_id = os.environ["BATCH_COMPUTE_DAG_INSTANCE_ID"]
counts = dict.fromkeys(conf.LEVELS, 0)
with open(os.path.join(conf.INPUT, "split_results", f"{instance_id}.txt")) as fh:
    for line in fh:
        for level in conf.LEVELS:
            if level in line:
                counts[level] += 1
out = os.path.join(conf.OUTPUT, "count_results")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"{instance_id}.txt"), "w") as fh:
    fh.writelines(f"{level} {n}\n" for level, n in counts.items())
print(f"part {instance_id}: {counts}")
