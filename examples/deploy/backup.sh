#!/bin/sh
# backup.sh DATADIR DEST: a consistent copy of a logd-trio data directory, taken while it runs.
#
# Each topic's copy is a contiguous run of its batches, like the directory after a crash at
# some moment: partition files are append-only and only the newest one grows, so the older
# ones are copied as they are and the newest one up to where it was written when the copy
# read it (a batch cut in half there is truncated by the restore's recovery).  Partitions go
# oldest first, each index before its log (an index is checked against its log and rebuilt if
# it disagrees).  When retention removes a partition before it is copied, the copies of the
# older ones are dropped too, so the copy never has a gap.  The lock file is not copied.
set -eu
[ $# -eq 2 ] || { echo "usage: backup.sh DATADIR DEST" >&2; exit 2; }
src=$1
dest=$2
[ -d "$src" ] || { echo "backup.sh: $src is not a directory" >&2; exit 2; }
mkdir -p "$dest"
chmod 0700 "$dest"
for f in "$src"/*; do  # the node's own files (leader-epoch with replication)
    [ -f "$f" ] || continue
    [ "$(basename "$f")" = logd.lock ] && continue
    cp -p "$f" "$dest/"
done
for dir in "$src"/*/; do
    [ -d "$dir" ] || continue
    topic=$(basename "$dir")
    case "$topic" in "~deleted~"*) continue ;; esac  # a deletion under way
    mkdir -p "$dest/$topic"
    for f in "$dir"*; do  # epoch files, corrupt-copies: small, copied as they are
        case "$(basename "$f")" in *.log | *.index | *.idx) continue ;; esac
        [ -f "$f" ] && cp -p "$f" "$dest/$topic/"
    done
    copied_newest=no
    while [ "$copied_newest" = no ]; do  # again if retention overtook the whole list
        for start in $(ls "$dir" | sed -n 's/^\([0-9][0-9]*\)\.log$/\1/p' | sort -n); do
            if [ -f "$dir$start.index" ]; then cp -p "$dir$start.index" "$dest/$topic/" 2>/dev/null || true; fi
            if cp -p "$dir$start.log" "$dest/$topic/" 2>/dev/null; then
                copied_newest=yes
            elif [ -e "$dir$start.log" ]; then
                echo "backup.sh: cannot copy $dir$start.log" >&2
                exit 1
            else  # removed by retention meanwhile: the older copies are older than what the topic keeps
                rm -f "$dest/$topic/"*.log "$dest/$topic/"*.index
                copied_newest=no
            fi
        done
        ls "$dir" | grep -q '^[0-9][0-9]*\.log$' || break  # no partition at all
    done
done
echo "backup.sh: copied $src to $dest"
