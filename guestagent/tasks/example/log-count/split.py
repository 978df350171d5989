"""split: cut the log into conf.PARTS pieces, written under split_results/."""

import os

import conf

with open(os.path.join(conf.INPUT, conf.DATA)) as fh:
    lines = fh.readlines()
out = os.path.join(conf.OUTPUT, "split_results")
os.makedirs(out, exist_ok=True)
size = (len(lines) + conf.PARTS - 1) // conf.PARTS
for i in range(conf.PARTS):
    with open(os.path.join(out, f"{i}.txt"), "w") as fh:
        fh.writelines(lines[i * size:(i + 1) * size])
print(f"split {len(lines)} lines into {conf.PARTS} parts")
