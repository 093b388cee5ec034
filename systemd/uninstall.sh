#!/usr/bin/env bash
# Remove daad-agent from a Jetson: stop and disable every agent, remove the units and the virtualenv.
# Config (/etc/daad-inspect), data (/var/lib/daad-inspect: bundles, spool, frames) and plans
# (/var/cache/daad-inspect) stay unless --purge. install.sh also puts a copy at /opt/daad-inspect/uninstall.sh.
set -euo pipefail

PROG=uninstall.sh
USER_NAME=daad

usage() {
  cat <<EOF
Usage: $PROG [--purge] [--prefix DIR]

Stops and disables daad-agent.service and every daad-agent@NAME.service, removes their unit files and
the drop-ins install.sh wrote (your own 'systemctl edit' overrides stay), and /opt/daad-inspect.
Keeps /etc/daad-inspect (config, thresholds, MQTT password), /var/lib/daad-inspect (bundles, spool,
saved frames) and /var/cache/daad-inspect (TensorRT plans), so installing again resumes where it was.

  --purge        also remove those three and the user '$USER_NAME': events still in the spool are lost
  --prefix DIR   act on a staging tree made by 'install.sh --prefix DIR' (also DESTDIR=DIR):
                 systemctl and userdel are printed, not run
  -h, --help     this text
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

PURGE=0 PREFIX="${DESTDIR:-}"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1 ;;
    --prefix)
      [ "$#" -ge 2 ] || die "--prefix needs a directory"
      PREFIX=$2
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *)
      printf '%s: unknown option %s (see --help)\n' "$PROG" "$1" >&2
      exit 2
      ;;
  esac
  shift
done

STAGED=0
if [ -n "$PREFIX" ]; then
  [ -d "$PREFIX" ] || die "--prefix $PREFIX: not a directory"
  STAGED=1
  PREFIX=$(cd "$PREFIX" && pwd)
elif [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo $0)"
fi
UNIT_DIR=$PREFIX/etc/systemd/system
system() {
  if [ "$STAGED" -eq 1 ]; then say "would run:$(printf ' %q' "$@")"; else "$@"; fi
}
HAVE_SYSTEMCTL=0
if [ "$STAGED" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then HAVE_SYSTEMCTL=1; fi

# -- stop and disable every agent: the plain unit, running instances, enabled instances ----------
units=(daad-agent.service)
if [ "$HAVE_SYSTEMCTL" -eq 1 ]; then
  while read -r unit _; do
    if [ -n "$unit" ]; then units+=("$unit"); fi
  done < <(systemctl list-units --all --plain --no-legend 'daad-agent@*.service' 2>/dev/null || true)
fi
for link in "$UNIT_DIR"/*.wants/daad-agent@*.service; do
  if [ -L "$link" ]; then units+=("$(basename "$link")"); fi
done
mapfile -t units < <(printf '%s\n' "${units[@]}" | sort -u)
if [ "$HAVE_SYSTEMCTL" -eq 1 ] || [ "$STAGED" -eq 1 ]; then
  for unit in "${units[@]}"; do
    system systemctl disable --now "$unit" || true # already stopped or never enabled: fine
  done
fi
# An enabled unit's links when systemctl did not remove them (staging tree, no systemctl).
rm -f "$UNIT_DIR"/*.wants/daad-agent.service "$UNIT_DIR"/*.wants/daad-agent@*.service

# -- units and drop-ins written by install.sh -------------------------------------------------------
rm -f "$UNIT_DIR/daad-agent.service" "$UNIT_DIR/daad-agent@.service"
for dropins in "$UNIT_DIR/daad-agent.service.d" "$UNIT_DIR/daad-agent@.service.d"; do
  rm -f "$dropins/10-devices.conf" "$dropins/20-credentials-compat.conf"
  if [ -d "$dropins" ]; then rmdir --ignore-fail-on-non-empty "$dropins"; fi
done
say "removed the units from $UNIT_DIR"
if [ "$HAVE_SYSTEMCTL" -eq 1 ] || [ "$STAGED" -eq 1 ]; then
  system systemctl daemon-reload
  system systemctl reset-failed 'daad-agent*' || true
fi

rm -rf "$PREFIX/opt/daad-inspect"
say "removed $PREFIX/opt/daad-inspect (virtualenv, helper)"

if [ "$PURGE" -eq 1 ]; then
  rm -rf "$PREFIX/etc/daad-inspect" "$PREFIX/var/lib/daad-inspect" "$PREFIX/var/cache/daad-inspect"
  say "purged $PREFIX/etc/daad-inspect, $PREFIX/var/lib/daad-inspect, $PREFIX/var/cache/daad-inspect"
  if [ "$STAGED" -eq 1 ] || getent passwd "$USER_NAME" >/dev/null; then
    system userdel "$USER_NAME"
  fi
else
  say "kept $PREFIX/etc/daad-inspect (config, thresholds, password), $PREFIX/var/lib/daad-inspect (bundles, spool, frames), $PREFIX/var/cache/daad-inspect (plans); --purge removes them"
fi
