#!/bin/sh
# preStop hook of Asterisk. While the agent drains the node (its own preStop: no new
# conference here, those here end by node.drain_deadline), this waits until Asterisk has no
# channel left, or MAX_WAIT seconds, so Asterisk is not stopped under live calls.
# It reads Asterisk itself rather than a mark left by the agent: Kubernetes also runs preStop
# hooks before a liveness restart, so such a mark could be stale. An Asterisk whose CLI has
# failed every ask for MAX_FAILING seconds (a minute by default) is hung, which is why the
# liveness probe restarts it, and is not waited for; one slow answer during a long drain is
# not that, and does not end the wait under live calls. (A liveness restart is cut at the
# probe's own 30 s grace whatever this does.)
# No channel must be seen QUIET_CHECKS times in a row (10 s by default), not once: the hooks
# start together, and the agent's drain still admits, for up to 5 s, the first caller of a
# conference placed here just before the stop, who is on the way to Asterisk while it has
# no channel yet.
max_wait="${1:-14460}"
max_failing="${2:-60}"
poll="${POLL_SECONDS:-2}"
quiet_checks="${QUIET_CHECKS:-5}"
start=$(date +%s)
failing_since=""
quiet=0
cli() {
  if command -v timeout >/dev/null 2>&1; then
    timeout 10 asterisk -rx "$1"
  else
    asterisk -rx "$1"
  fi
}
while [ $(( $(date +%s) - start )) -lt "$max_wait" ]; do
  if out=$(cli "core show channels count" 2>/dev/null); then
    failing_since=""
    n=$(printf '%s\n' "$out" | sed -n 's/^\([0-9][0-9]*\) active channel.*/\1/p' | head -n 1)
    if [ "$n" = "0" ]; then
      quiet=$((quiet + 1))
      [ "$quiet" -ge "$quiet_checks" ] && break
    else
      quiet=0
    fi
  else
    quiet=0
    now=$(date +%s)
    [ -z "$failing_since" ] && failing_since=$now
    [ $(( now - failing_since )) -ge "$max_failing" ] && break
  fi
  sleep "$poll"
done
