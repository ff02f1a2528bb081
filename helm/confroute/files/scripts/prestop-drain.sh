#!/bin/sh
# preStop hook of the confroute-node agent: drains the node through the agent's own HTTP port
# (no new conference here; those already here keep taking joiners) and waits until every
# conference on it has ended. `shutdown=true` makes it the drain SIGTERM starts: the agent
# exits once empty, and the pod's next agent (after a liveness restart) serves; an admin's
# drain would carry over into it. The agent ends what is left at node.drain_deadline, so the wait
# is bounded; MAX_WAIT bounds it again should the agent stop answering. Asterisk's own preStop
# waits meanwhile until it has no channel left, so it is stopped only once no call is left.
# An agent still starting (it watches a last life's record for up to two minutes before it
# serves HTTP) is asked again for DRAIN_RETRY seconds; one that keeps failing to list its
# conferences for a minute is given up on.
set -u
url="http://127.0.0.1:${AGENT_PORT}"
max_wait="${MAX_WAIT:-14460}"
drain_retry="${DRAIN_RETRY:-150}"
poll="${POLL_SECONDS:-5}"
token="${CONFROUTE_HTTP__API_TOKEN:-}"

call() {
  if [ -n "$token" ]; then
    curl -fsS -m 10 -H "Authorization: Bearer ${token}" "$@"
  else
    curl -fsS -m 10 "$@"
  fi
}

# One clock for the whole hook: MAX_WAIT is sized to end before the pod's grace period.
start=$(date +%s)
until call -X POST "${url}/v1/drain?shutdown=true" >/dev/null; do
  if [ $(( $(date +%s) - start )) -ge "$drain_retry" ]; then
    echo "preStop: drain request to ${url} failed for ${drain_retry} s; stopping without waiting" >&2
    exit 0
  fi
  sleep "$poll"
done
failed_since=""
while [ $(( $(date +%s) - start )) -lt "$max_wait" ]; do
  if body=$(call "${url}/v1/conferences"); then
    failed_since=""
    case "$body" in
      *'"items":[]'*) break ;;
    esac
  else
    now=$(date +%s)
    [ -z "$failed_since" ] && failed_since=$now
    if [ $(( now - failed_since )) -ge 60 ]; then
      echo "preStop: ${url} has not listed its conferences for 60 s; stopping the wait" >&2
      break
    fi
  fi
  sleep "$poll"
done
