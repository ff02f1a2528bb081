#!/bin/sh
# preStop hook of Asterisk: waits until the agent's preStop has drained the node (or MAX_WAIT
# seconds), so Asterisk is not stopped under live calls.
max_wait="${1:-14460}"
waited=0
while [ ! -e /run/confroute/drained ] && [ "$waited" -lt "$max_wait" ]; do
  sleep 2
  waited=$((waited + 2))
done
