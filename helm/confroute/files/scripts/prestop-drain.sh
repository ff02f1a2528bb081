#!/bin/sh
# preStop hook of the confroute-node agent: drains the node through the agent's own HTTP port
# (no new conference here; those already here keep taking joiners) and waits until every
# conference on it has ended. `shutdown=true` makes it the drain SIGTERM starts: the agent
# exits once empty, and the pod's next agent (after a liveness restart) serves; an admin's
# drain would carry over into it. The agent ends what is left at node.drain_deadline, so the wait
# is bounded; MAX_WAIT bounds it again should the agent stop answering. Asterisk's own preStop
# waits meanwhile until it has no channel left, so it is stopped only once no call is left.
set -u
url="http://127.0.0.1:${AGENT_PORT}"
max_wait="${MAX_WAIT:-14460}"
token="${CONFROUTE_HTTP__API_TOKEN:-}"

call() {
  if [ -n "$token" ]; then
    curl -fsS -m 10 -H "Authorization: Bearer ${token}" "$@"
  else
    curl -fsS -m 10 "$@"
  fi
}

if ! call -X POST "${url}/v1/drain?shutdown=true" >/dev/null; then
  echo "preStop: drain request to ${url} failed; stopping without waiting" >&2
  exit 0
fi
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt "$max_wait" ]; do
  body=$(call "${url}/v1/conferences") || break
  case "$body" in
    *'"items":[]'*) break ;;
  esac
  sleep 5
done
