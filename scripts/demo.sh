#!/usr/bin/env bash
# The README's first session: a daemon in the background, the tiny guest
# imported, one VM booted and cloned, a snapshot taken and reverted to,
# its console and details printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export LODGE_HOME=${LODGE_HOME:-$PWD/build/demo}
lodge=$PWD/bin/lodge
mkdir -p "$LODGE_HOME"

if [ "${1:-}" = clean ]; then
  "$lodge" delete --force demo demo-clone 2>/dev/null || true
  [ -f "$LODGE_HOME/daemon.pid" ] && kill "$(cat "$LODGE_HOME/daemon.pid")" 2>/dev/null || true
  sleep 1
  rm -rf "$LODGE_HOME"
  echo "demo removed"
  exit 0
fi

if ! "$lodge" host info >/dev/null 2>&1; then
  echo "== starting the daemon (log: $LODGE_HOME/daemon.log)"
  nohup "$lodge" daemon >"$LODGE_HOME/daemon.log" 2>&1 &
  echo $! >"$LODGE_HOME/daemon.pid"
  for _ in $(seq 50); do "$lodge" host info >/dev/null 2>&1 && break; sleep 0.2; done
fi
"$lodge" host info

if ! "$lodge" image show tiny >/dev/null 2>&1; then
  echo "== importing the tiny guest"
  "$lodge" image import build/guest/tiny.qcow2 --name tiny
fi
if ! "$lodge" show demo >/dev/null 2>&1; then
  echo "== creating and starting VM demo"
  "$lodge" create demo --image tiny --memory 256M --start >/dev/null
elif [ "$("$lodge" show demo -o json | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p' | head -1)" != running ]; then
  "$lodge" start demo >/dev/null
fi
# ready VM: waits for the guest agent and for the guest to apply its seed.
ready() {
  "$lodge" exec "$1" --wait 120s -- true
  for _ in $(seq 600); do
    "$lodge" console "$1" --log | grep -q "lodge-guest: ready" && break
    sleep 0.2
  done
}
echo "== waiting for the guest agent and for the guest to apply its seed"
ready demo
echo "== inside the guest (lodge exec demo -- ...)"
"$lodge" exec demo -- sh -c 'echo "hostname:   $(hostname)"; echo "machine-id: $(cat /etc/machine-id)"; uname -sr'
if ! "$lodge" show demo-clone >/dev/null 2>&1; then
  echo "== linked clone of the running VM (lodge clone demo demo-clone --start)"
  "$lodge" clone demo demo-clone --start >/dev/null
fi
ready demo-clone
echo "== inside the clone: same disk, new identity"
"$lodge" exec demo-clone -- sh -c 'echo "hostname:   $(hostname)"; echo "machine-id: $(cat /etc/machine-id)"'
echo "== snapshot with memory, a mistake, and a revert"
"$lodge" exec demo -- sh -c 'echo precious >/root/data; sleep 100000 </dev/null >/dev/null 2>&1 & echo $! >/tmp/worker'
"$lodge" snapshot delete demo before >/dev/null 2>&1 || true
"$lodge" snapshot create demo before
"$lodge" exec demo -- sh -c 'rm /root/data; kill $(cat /tmp/worker)'
"$lodge" snapshot revert demo before >/dev/null
"$lodge" exec demo -- sh -c 'echo "after revert: /root/data holds $(cat /root/data), worker $(cat /tmp/worker) $(kill -0 $(cat /tmp/worker) && echo runs)"'
"$lodge" snapshot list demo
echo "== console (lodge console demo --log)"
"$lodge" console demo --log | tr -d '\r' | sed 's/\x1b\[[0-9;]*[a-zA-Z]//g' | grep -v '^$' | tail -n 12
echo "== lodge show demo"
"$lodge" show demo
echo
echo "Try: LODGE_HOME=$LODGE_HOME $lodge exec demo -- cat /etc/machine-id"
echo "     LODGE_HOME=$LODGE_HOME $lodge console demo      (Ctrl-] to leave)"
echo "Clean up with: make demo-clean"
