#!/usr/bin/env python3
"""Check that every option of a Kconfig fragment holds in a final kernel .config.

Kconfig drops a requested option without a word when one of its dependencies is off, so a
fragment alone proves nothing about the kernel that was built. Prints one line per option whose
final value differs from the fragment and exits 1 if there is any.

usage: check-kernel-config.py FRAGMENT DOTCONFIG
"""

import re
import sys

SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def read_options(path):
    """Map each option named in a config file to its value; "n" for "is not set"."""
    options = {}
    with open(path, encoding="utf-8") as config:
        for line in config:
            line = line.strip()
            match = SET.match(line)
            if match:
                options[match.group(1)] = match.group(2)
                continue
            match = UNSET.match(line)
            if match:
                options[match.group(1)] = "n"
    return options


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    fragment_path, dotconfig_path = sys.argv[1], sys.argv[2]
    wanted = read_options(fragment_path)
    final = read_options(dotconfig_path)
    wrong = []
    for name, want in wanted.items():
        # An option absent from .config is off: its menu or dependencies are not enabled.
        got = final.get(name, "n")
        if got != want:
            wrong.append((name, want, "absent (dependencies off)" if name not in final else got))
    for name, want, got in wrong:
        print(f"{name}: fragment wants {want}, final .config has {got}")
    if wrong:
        print(
            f"{len(wrong)} option(s) of {fragment_path} did not take in {dotconfig_path}",
            file=sys.stderr,
        )
        sys.exit(1)
    print(f"all {len(wanted)} options of the fragment hold in the final .config")


if __name__ == "__main__":
    main()
