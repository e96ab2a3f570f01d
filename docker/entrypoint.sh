#!/bin/sh
# Container entrypoint: make the writable folders usable by the runtime user, then run the command as that user.
#
# Started as root (the image default): every entry of the writable folders not owned by STRUCTXLIP_UID:GID is
# chowned to it (a bind-mounted ./outputs that Docker created as root, a cache volume from an older image), then the
# command runs as that uid/gid via setpriv. Started as another user (compose `user:` / `docker run --user`): nothing
# is chowned; a writable folder that this user cannot write is reported in one line and the container exits 1.
#
# The command: `structxlip ...`, `prefect ...` or any program on PATH; a first argument that is not a program
# (`demo`, `run`, `--help`) is a structxlip subcommand, so `docker run IMAGE demo` works.
#
# Environment:
#   STRUCTXLIP_UID / STRUCTXLIP_GID   runtime uid/gid when started as root (default 1000 / the uid); set them to
#                                     your host `id -u` / `id -g` so outputs on the host are yours
#   STRUCTXLIP_WRITABLE_DIRS          space-separated folders to prepare (default: /data/out, the cache folder,
#                                     PREFECT_HOME)
set -eu

uid="${STRUCTXLIP_UID:-1000}"
gid="${STRUCTXLIP_GID:-$uid}"
dirs="${STRUCTXLIP_WRITABLE_DIRS:-/data/out ${XDG_CACHE_HOME:-${HOME:-/home/structxlip}/.cache} ${PREFECT_HOME:-}}"

case "$uid$gid" in
    *[!0-9]*|"") echo "entrypoint: STRUCTXLIP_UID/STRUCTXLIP_GID must be numbers, got '$uid'/'$gid'" >&2; exit 2 ;;
esac

if [ "$#" -eq 0 ]; then
    set -- structxlip --help
elif ! command -v "$1" >/dev/null 2>&1; then
    set -- structxlip "$@"
fi

if [ "$(id -u)" = 0 ] && [ "$uid" != 0 ]; then
    for dir in $dirs; do
        mkdir -p "$dir"
        # Only entries with the wrong owner: cheap on a large output folder that is already right. -h: a symlink
        # inside is chowned itself, never the file it points to.
        if ! find "$dir" -xdev \( ! -uid "$uid" -o ! -gid "$gid" \) -exec chown -h "$uid:$gid" {} + 2>/dev/null; then
            echo "entrypoint: warning: could not give $dir to uid $uid (read-only or root-squashed mount?)" >&2
        fi
    done
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
fi

for dir in $dirs; do
    if [ -e "$dir" ] && ! [ -w "$dir" ]; then
        echo "entrypoint: $dir is not writable by uid $(id -u): chown it on the host (sudo chown -R $(id -u):$(id -g) DIR) or start the container as root so it can fix ownership" >&2
        exit 1
    fi
done
exec "$@"
