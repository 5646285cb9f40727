#!/bin/sh
# Shared by the bundle's entry points (install, configure, uninstall, bootstrap). The frozen agent carries its own
# loader and C library, so the system's glibc does not matter; the kernel does. Refuse, with a clear error, a kernel
# older than the bundled C library runs on (bundle.json: kernel_floor), before its loader would abort; then run it.
here=$(cd "$(dirname "$0")" && pwd)
command=$1
shift

# Whether kernel release $1 (e.g. 5.10.0-28-amd64) is older than MAJOR.MINOR $2; an unreadable release is not.
kernel_older_than() {
    k_major=${1%%.*}
    k_rest=${1#"$k_major".}
    k_minor=${k_rest%%[!0-9]*}
    f_major=${2%%.*}
    f_minor=${2#*.}
    case "$k_major.$k_minor.$f_major.$f_minor" in
        *[!0-9.]* | *..* | .* | *.) return 1 ;;
    esac
    [ "$k_major" -lt "$f_major" ] || { [ "$k_major" -eq "$f_major" ] && [ "$k_minor" -lt "$f_minor" ]; }
}

floor=$(sed -n 's/.*"kernel_floor": *"\([0-9][0-9]*\.[0-9][0-9]*\)".*/\1/p' "$here/bundle.json")
# What `uname -r` prints, read from /proc first as the agent's launcher does (and where a test can show another one).
release=$(cat /proc/sys/kernel/osrelease 2>/dev/null || uname -r)
if [ -n "$floor" ] && kernel_older_than "$release" "$floor"; then
    echo "error PRQ-KERNEL: Linux $release is older than $floor, the oldest kernel the agent's bundled C library runs on" >&2
    echo "  fix: Run the agent on a kernel at or above the floor in the message (a supported release, docs/support-matrix.md); older kernels cannot run its bundled C library." >&2
    exit 3
fi
if [ "$command" = install ] || [ "$command" = bootstrap ]; then
    exec "$here/mobility/mobility" "$command" --bundle "$here" "$@"
fi
exec "$here/mobility/mobility" "$command" "$@"
