#!/bin/sh
# Shared by the bundle's entry points (install, configure, uninstall, bootstrap): refuse, with a clear error, a system
# whose glibc is older than the one the frozen agent was built against (it would not even load), then run it.
here=$(cd "$(dirname "$0")" && pwd)
command=$1
shift
floor=$(sed -n 's/.*"glibc_floor": *"\([0-9][0-9.]*\)".*/\1/p' "$here/bundle.json")
have=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed 's/^glibc //')
if [ -n "$floor" ] && [ -n "$have" ] && [ "$have" != "$floor" ]; then
    oldest=$(printf '%s\n%s\n' "$have" "$floor" | sort -t. -k1,1n -k2,2n | head -n 1)
    if [ "$oldest" = "$have" ]; then
        echo "error PRQ-GLIBC: glibc $have is older than $floor, the floor of this bundle: its binaries would not load" >&2
        echo "  fix: Use an installer bundle built for this system's glibc (built on the oldest system of its family), or upgrade the system." >&2
        exit 3
    fi
fi
if [ "$command" = install ] || [ "$command" = bootstrap ]; then
    exec "$here/mobility/mobility" "$command" --bundle "$here" "$@"
fi
exec "$here/mobility/mobility" "$command" "$@"
