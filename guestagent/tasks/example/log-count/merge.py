"""merge: add up the counts into merge_result.txt (the guide's JSON object)."""

import os

import conf

total = dict.fromkeys(conf.LEVELS, 0)
for i in range(conf.PARTS):
    with open(os.path.join(conf.INPUT, "count_results", f"{i}.txt")) as fh:
        for line in fh:
            level, n = line.split()
            total[level] += int(n)
result = "{" + ", ".join(f'"{level}": {n}' for level, n in total.items()) + "}"
with open(os.path.join(conf.OUTPUT, "merge_result.txt"), "w") as fh:
    fh.write(result)
print(result)
