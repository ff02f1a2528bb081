#!/bin/sh
# preStop hook of Asterisk. While the agent drains the node (its own preStop: no new
# conference here, those here end by node.drain_deadline), this waits until Asterisk has no
# channel left, or MAX_WAIT seconds, so Asterisk is not stopped under live calls.
# It reads Asterisk itself rather than a mark left by the agent: Kubernetes also runs preStop
# hooks before a liveness restart, so such a mark could be stale. An Asterisk that does not
# answer its CLI (hung, which is why the liveness probe restarts it) is not waited for.
max_wait="${1:-14460}"
waited=0
cli() {
  if command -v timeout >/dev/null 2>&1; then
    timeout 10 asterisk -rx "$1"
  else
    asterisk -rx "$1"
  fi
}
while [ "$waited" -lt "$max_wait" ]; do
  out=$(cli "core show channels count" 2>/dev/null) || break
  n=$(printf '%s\n' "$out" | sed -n 's/^\([0-9][0-9]*\) active channel.*/\1/p' | head -n 1)
  [ "$n" = "0" ] && break
  sleep 2
  waited=$((waited + 2))
done
