#!/usr/bin/env bash
# `make all`'s stages one at a time, each under /usr/bin/time: wall and CPU seconds (user + system, all
# threads) and peak RSS per stage, with the load average before and after each. Set-up must be done.
#
#     bash bench/make_stages.sh            # RUN=stages; prints the table, logs in runs/.make-stages/
#     RUN=speed bash bench/make_stages.sh  # another run name (each stage reruns only if out of date)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-stages}
OUT=runs/.make-stages/$RUN
mkdir -p "$OUT"
STAGES="seeds generate classify instances filter score export train eval report"
load() { cut -d' ' -f1 /proc/loadavg; }
printf '| stage | wall s | CPU s | peak RSS MB | load before, after |\n| --- | ---: | ---: | ---: | --- |\n'
for s in $STAGES; do
  before=$(load)
  # -o: never redo the set-up (a worktree sharing another checkout's venv has an older stamp)
  /usr/bin/time -f '%e %U %S %M' -o "$OUT/$s.time" make -o .venv/.setup-done -o .venv/.model-done \
    RUN="$RUN" "$s" > "$OUT/$s.log" 2>&1 || { echo "$s failed: $OUT/$s.log" >&2; exit 1; }
  read -r wall user sys rss < "$OUT/$s.time"
  printf '| %s | %.1f | %.1f | %d | %s, %s |\n' "$s" "$wall" "$(awk "BEGIN {print $user + $sys}")" $((rss / 1024)) \
    "$before" "$(load)"
done
