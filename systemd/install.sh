#!/usr/bin/env bash
# Install (or upgrade) daad-agent on a Jetson as a systemd service. `install.sh --help` is the manual;
# systemd/README.md is the walk-through. Running it again is an upgrade: nothing installed by hand
# (config, thresholds, password) is overwritten unless asked.
set -euo pipefail
umask 022 # the agent (user daad) must be able to read what root installs here

PROG=install.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/.." && pwd) # the project checkout (pyproject.toml, examples/)

USER_NAME=daad
NAME_RE='^[A-Za-z0-9_.-]+$' # station ids: MQTT topic level, file names (camera/config.py NAME_PATTERN)
MIN_L4T_MAJOR=35            # JetPack 5 (L4T 35) and later: TensorRT >= 8.5, Python >= 3.8
CREDENTIALS_MIN_SYSTEMD=247 # LoadCredential= appeared in systemd 247 (JetPack 5 ships 245)
# Device nodes of the GPU, codecs and NvSci that differ between JetPack releases; the unit allows
# char-video4linux, char-drm and /dev/nvmap itself (see daad-agent.service).
DEV=${DAAD_DEV_DIR:-/dev} # override: tests
DEVICE_PATTERNS=("$DEV"/nvhost-* "$DEV"/nvgpu/*/* "$DEV"/host1x* "$DEV"/nvsciipc "$DEV"/nvidia* "$DEV"/v4l2-nv*)

usage() {
  cat <<EOF
Usage: $PROG [OPTIONS]

Install daad-agent on this Jetson: system user '$USER_NAME', a virtualenv in /opt/daad-inspect/venv
that sees JetPack's TensorRT and OpenCV, the model bundle, config, thresholds, MQTT password and the
systemd units; then enable and (re)start the agent. Run it again to upgrade.

What to install:
  --bundle DIR             model bundle (bundle.yaml + model.onnx) from 'daad-train export'; stored in
                           /var/lib/daad-inspect/bundles/<sha12>/, 'current' points at it, older ones stay
  --thresholds FILE        thresholds.yaml from 'daad-calibrate fit', made for that bundle
  --config FILE            agent config (default: examples/agent.yaml); an existing one is kept
  --force-config           replace an existing config (the old one is kept as .bak.<time>)
  --mqtt-password-file F   broker password file ('-': read it from stdin) -> systemd credential
  --station NAME           station id for daad-agent.service (DAAD_STATION; default: the host name)
  --instance NAME          install for daad-agent@NAME.service instead (one agent per camera):
                           config /etc/daad-inspect/NAME.yaml, thresholds NAME.thresholds.yaml,
                           bundle link bundles/current@NAME
Other actions:
  --rollback               point the bundle link back at the previous bundle (and restore the
                           thresholds kept for it), restart the agent; a second --rollback undoes it
Python:
  --python PATH            interpreter of the virtualenv (default: python3, JetPack's)
  --wheelhouse DIR         offline: pip installs only from DIR (a daad_inspect-*.whl there is used
                           instead of building the checkout)
  --extras LIST            project extras to install (default: jetson; '' for none)
  --skip-venv              leave the virtualenv alone (bundle/config/units only; tests)
Where and how:
  --prefix DIR             install into DIR as a staging root (also DESTDIR=DIR): no useradd, chown
                           or systemctl, they are printed instead
  --no-start               enable the unit but do not (re)start it
  --not-jetson-ok          install where /etc/nv_tegra_release is missing (ONNX Runtime on the CPU)
  -h, --help               this text
Environment (tests): DAAD_TEGRA_RELEASE=FILE instead of /etc/nv_tegra_release, DAAD_SYSTEMD_VERSION=N
instead of systemctl --version's, DAAD_DEV_DIR=DIR instead of /dev when listing device nodes.

Examples:
  sudo systemd/install.sh --bundle bundle/ --thresholds thresholds.yaml --mqtt-password-file - <<< 'secret'
  sudo systemd/install.sh --bundle new-bundle/ --thresholds new-thresholds.yaml     # upgrade the model
  sudo systemd/install.sh --rollback
  systemd/install.sh --prefix /tmp/root --not-jetson-ok --skip-venv                 # dry trial
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}
usage_error() {
  printf '%s: %s (see --help)\n' "$PROG" "$*" >&2
  exit 2
}

# -- options -----------------------------------------------------------------------------------
BUNDLE="" THRESHOLDS="" CONFIG="" FORCE_CONFIG=0 MQTT_PASSWORD_FILE="" STATION="" INSTANCE=""
ROLLBACK=0 PYTHON=python3 WHEELHOUSE="" EXTRAS=jetson SKIP_VENV=0 PREFIX="${DESTDIR:-}" NO_START=0
NOT_JETSON_OK=0
need_value() { [ "$#" -ge 2 ] || usage_error "$1 needs a value"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --bundle) need_value "$@"; BUNDLE=$2; shift ;;
    --thresholds) need_value "$@"; THRESHOLDS=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --force-config) FORCE_CONFIG=1 ;;
    --mqtt-password-file) need_value "$@"; MQTT_PASSWORD_FILE=$2; shift ;;
    --station) need_value "$@"; STATION=$2; shift ;;
    --instance) need_value "$@"; INSTANCE=$2; shift ;;
    --rollback) ROLLBACK=1 ;;
    --python) need_value "$@"; PYTHON=$2; shift ;;
    --wheelhouse) need_value "$@"; WHEELHOUSE=$2; shift ;;
    --extras) need_value "$@"; EXTRAS=$2; shift ;;
    --skip-venv) SKIP_VENV=1 ;;
    --prefix) need_value "$@"; PREFIX=$2; shift ;;
    --no-start) NO_START=1 ;;
    --not-jetson-ok) NOT_JETSON_OK=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
  shift
done

for name in "$STATION" "$INSTANCE"; do
  if [ -n "$name" ] && ! [[ $name =~ $NAME_RE ]]; then
    usage_error "station/instance name '$name' may only contain letters, digits, '_', '.' and '-'"
  fi
done
if [ "$ROLLBACK" -eq 1 ] && [ -n "$BUNDLE$THRESHOLDS$CONFIG$MQTT_PASSWORD_FILE$STATION" ]; then
  usage_error "--rollback takes no --bundle, --thresholds, --config, --mqtt-password-file or --station"
fi
[ -n "$INSTANCE" ] && [ -n "$STATION" ] && usage_error "--station is for daad-agent.service; with --instance the instance name is the station"
for f in "$BUNDLE" "$THRESHOLDS" "$CONFIG"; do
  [ -z "$f" ] || [ -e "$f" ] || die "$f: not found"
done
[ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: not a directory"
if [ -n "$MQTT_PASSWORD_FILE" ] && [ "$MQTT_PASSWORD_FILE" != - ] && [ ! -f "$MQTT_PASSWORD_FILE" ]; then
  die "--mqtt-password-file $MQTT_PASSWORD_FILE: not a file"
fi

# -- is this a Jetson? ----------------------------------------------------------------------------
TEGRA_RELEASE=${DAAD_TEGRA_RELEASE:-/etc/nv_tegra_release} # override: tests
ON_JETSON=0
if [ -r "$TEGRA_RELEASE" ]; then
  # "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
  L4T=$(sed -n 's/^# R\([0-9]*\) (release), REVISION: \([0-9.]*\).*/\1.\2/p' "$TEGRA_RELEASE" | head -n 1)
  L4T_MAJOR=${L4T%%.*}
  case "$L4T_MAJOR" in
    35) JETPACK="JetPack 5" ;;
    36) JETPACK="JetPack 6" ;;
    38) JETPACK="JetPack 7" ;;
    *) JETPACK="JetPack unknown" ;;
  esac
  ON_JETSON=1
  if [ -z "$L4T" ]; then
    warn "$TEGRA_RELEASE: release line not recognised; continuing as a Jetson of unknown L4T"
  else
    say "Jetson: L4T $L4T ($JETPACK), from $TEGRA_RELEASE"
    if [ "$L4T_MAJOR" -lt "$MIN_L4T_MAJOR" ] && [ "$NOT_JETSON_OK" -eq 0 ]; then
      die "L4T $L4T is older than R$MIN_L4T_MAJOR (JetPack 5): TensorRT < 8.5 and Python < 3.8 are not supported; pass --not-jetson-ok to try anyway"
    fi
  fi
elif [ "$NOT_JETSON_OK" -eq 1 ]; then
  warn "no $TEGRA_RELEASE: not a Jetson; installing anyway (--not-jetson-ok): ONNX Runtime on the CPU, no TensorRT"
else
  die "this machine is not a Jetson (no $TEGRA_RELEASE): refusing to install. Pass --not-jetson-ok to install anyway (ONNX Runtime on the CPU, no TensorRT), or --prefix DIR --not-jetson-ok for a trial tree"
fi

# -- where ---------------------------------------------------------------------------------------
# STAGED=1: a trial tree under --prefix/DESTDIR; the system (users, systemd) is left alone.
STAGED=0
if [ -n "$PREFIX" ]; then
  STAGED=1
  mkdir -p "$PREFIX"
  PREFIX=$(cd "$PREFIX" && pwd)
elif [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo $0 ...), or try it in a staging tree with --prefix DIR"
fi
OPT=$PREFIX/opt/daad-inspect
VENV=$OPT/venv
ETC=$PREFIX/etc/daad-inspect
CRED_DIR=$ETC/credentials
STATE=$PREFIX/var/lib/daad-inspect
CACHE=$PREFIX/var/cache/daad-inspect
UNIT_DIR=$PREFIX/etc/systemd/system

if [ -n "$INSTANCE" ]; then
  UNIT="daad-agent@$INSTANCE.service"
  LINK_SUFFIX="@$INSTANCE"
  CONFIG_TARGET=$ETC/$INSTANCE.yaml
  THRESHOLDS_TARGET=$ETC/$INSTANCE.thresholds.yaml
  ENV_FILE=$ETC/$INSTANCE.env
else
  UNIT=daad-agent.service
  LINK_SUFFIX=""
  CONFIG_TARGET=$ETC/agent.yaml
  THRESHOLDS_TARGET=$ETC/thresholds.yaml
  ENV_FILE=$ETC/agent.env
fi
BUNDLES=$STATE/bundles
THRESHOLDS_ARCHIVE=$STATE/thresholds # thresholds kept per bundle, restored on rollback

# Commands that change the real system: printed, not run, in a staging tree.
system() {
  if [ "$STAGED" -eq 1 ]; then
    say "would run:$(printf ' %q' "$@")"
  else
    "$@"
  fi
}

HAVE_SYSTEMCTL=0
if [ "$STAGED" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
  HAVE_SYSTEMCTL=1
fi

# -- bundle store: bundles/<sha12>/, links current[@NAME] and previous[@NAME] ------------------
link_target() { # the <sha12> a link in bundles/ points at, or nothing
  local link=$BUNDLES/$1
  if [ -L "$link" ]; then basename "$(readlink "$link")"; fi
}
set_link() { # atomic: a new link renamed over the old one
  local name=$1 target=$2 tmp
  tmp=$BUNDLES/.$name.tmp.$$
  ln -sfn "$target" "$tmp"
  mv -Tf "$tmp" "$BUNDLES/$name"
}
graph_sha() { # full SHA-256 of a bundle's model.onnx, checked against its bundle.yaml
  local dir=$1 sha
  [[ -f $dir/bundle.yaml && -f $dir/model.onnx ]] ||
    die "$dir: not a model bundle (expected bundle.yaml and model.onnx written by 'daad-train export')"
  sha=$(sha256sum "$dir/model.onnx" | cut -d ' ' -f 1)
  grep -q "$sha" "$dir/bundle.yaml" ||
    die "$dir/model.onnx: SHA-256 ${sha:0:12}... is not the one in bundle.yaml: a truncated or modified copy; copy the bundle again"
  printf '%s\n' "$sha"
}
bundle_sha() { # the bundle's identity: its manifest_sha256 (verified by the agent's --check-config), else
  # (a bundle exported before manifests) its model.onnx's SHA-256
  local dir=$1 sha manifest
  sha=$(graph_sha "$dir") || exit 1
  manifest=$(sed -n 's/^manifest_sha256:[[:space:]]*\([0-9a-f]\{64\}\)[[:space:]]*$/\1/p' "$dir/bundle.yaml" | head -n 1)
  printf '%s\n' "${manifest:-$sha}"
}
thresholds_sha() { # bundle_sha256 field of a thresholds.yaml
  sed -n "s/^bundle_sha256:[[:space:]]*['\"]\{0,1\}\([0-9a-f]\{64\}\).*/\1/p" "$1" | head -n 1
}
thresholds_fit() { # thresholds file, bundle dir: made for this bundle (or, before manifests, for its graph)?
  local got want
  got=$(thresholds_sha "$1")
  want=$(bundle_sha "$2") || exit 1
  [ "$got" = "$want" ] && return 0
  if [ -n "$got" ] && [ "$got" = "$(graph_sha "$2")" ]; then
    warn "$1: bound to the bundle's graph only (written before bundle manifests): the agent accepts it; recalibrate (daad-calibrate fit) to bind it to bundle.yaml too"
    return 0
  fi
  return 1
}
archive_thresholds() { # keep the active thresholds with the bundle they were made for
  local id=$1
  if [ -n "$id" ] && [ -f "$THRESHOLDS_TARGET" ]; then
    mkdir -p "$THRESHOLDS_ARCHIVE"
    cp -p "$THRESHOLDS_TARGET" "$THRESHOLDS_ARCHIVE/$id$LINK_SUFFIX.yaml"
  fi
}
switch_bundle() { # make <sha12> current; the old one becomes previous; thresholds follow their bundle
  local new=$1 old kept
  old=$(link_target "current$LINK_SUFFIX")
  [ "$old" != "$new" ] || return 0
  archive_thresholds "$old"
  [ -z "$old" ] || set_link "previous$LINK_SUFFIX" "$old"
  set_link "current$LINK_SUFFIX" "$new"
  say "bundle: current$LINK_SUFFIX -> $new${old:+ (previous$LINK_SUFFIX -> $old)}"
  kept=$THRESHOLDS_ARCHIVE/$new$LINK_SUFFIX.yaml
  if [ -f "$kept" ]; then
    install -m 0644 "$kept" "$THRESHOLDS_TARGET"
    say "thresholds: restored those kept for bundle $new -> $THRESHOLDS_TARGET"
  fi
}

restart_unit() { # after a change of bundle/thresholds: restart the agent if it is meant to run
  if [ "$NO_START" -eq 1 ]; then
    say "not restarting $UNIT (--no-start)"
  elif [ "$STAGED" -eq 1 ]; then
    system systemctl restart --no-block "$UNIT"
  elif [ "$HAVE_SYSTEMCTL" -eq 1 ] && systemctl is-enabled --quiet "$UNIT" 2>/dev/null; then
    systemctl restart --no-block "$UNIT"
    say "restarting $UNIT; follow it with: journalctl -u $UNIT -f"
  fi
}

if [ "$ROLLBACK" -eq 1 ]; then
  current=$(link_target "current$LINK_SUFFIX")
  previous=$(link_target "previous$LINK_SUFFIX")
  [[ -n $previous && -d $BUNDLES/$previous ]] ||
    die "nothing to roll back to: no $BUNDLES/previous$LINK_SUFFIX (bundles kept there can be chosen by hand: ln -sfn <sha12> $BUNDLES/current$LINK_SUFFIX)"
  switch_bundle "$previous"
  [ -f "$THRESHOLDS_ARCHIVE/$previous$LINK_SUFFIX.yaml" ] ||
    warn "no thresholds kept for bundle $previous: the agent refuses $THRESHOLDS_TARGET (made for $current); recalibrate (systemd/README.md)"
  restart_unit
  say "rolled back: current$LINK_SUFFIX -> $previous (run --rollback again to return to $current)"
  exit 0
fi

# -- 0. check what was given, before anything changes -------------------------------------------------
BUNDLE_SHA=""
if [ -n "$BUNDLE" ]; then BUNDLE_SHA=$(bundle_sha "$BUNDLE"); fi
if [ -n "$THRESHOLDS" ]; then
  if [ -n "$BUNDLE_SHA" ]; then
    want=$BUNDLE_SHA
  else
    current=$(link_target "current$LINK_SUFFIX")
    [ -n "$current" ] || die "--thresholds needs a bundle: pass --bundle DIR too"
    want=$(bundle_sha "$BUNDLES/$current")
  fi
  got=$(thresholds_sha "$THRESHOLDS")
  [ -n "$got" ] || die "$THRESHOLDS: no bundle_sha256 field: not a thresholds.yaml written by 'daad-calibrate fit'"
  thresholds_fit "$THRESHOLDS" "${BUNDLE:-$BUNDLES/$current}" ||
    die "$THRESHOLDS: made for bundle ${got:0:12}..., but the bundle is ${want:0:12}...: calibrate on this bundle (daad-calibrate fit)"
fi

# -- 1. user -----------------------------------------------------------------------------------
say "user: $USER_NAME (system user, groups video and render)"
if [ "$STAGED" -eq 1 ] || ! getent group render >/dev/null; then system groupadd --system render; fi
if [ "$STAGED" -eq 1 ] || ! getent group video >/dev/null; then system groupadd --system video; fi
if [ "$STAGED" -eq 1 ] || ! getent passwd "$USER_NAME" >/dev/null; then
  system useradd --system --user-group --home-dir /var/lib/daad-inspect --no-create-home \
    --shell /usr/sbin/nologin --comment "DAAD inspection agent" "$USER_NAME"
fi
system usermod --append --groups video,render "$USER_NAME"

# -- 2. virtualenv -------------------------------------------------------------------------------
if [ "$SKIP_VENV" -eq 1 ]; then
  say "virtualenv: left alone (--skip-venv)"
else
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 8))' ||
    die "$PYTHON is older than Python 3.8 (JetPack 5 ships 3.8)"
  if [ ! -x "$VENV/bin/python" ]; then
    say "virtualenv: creating $VENV (--system-site-packages: JetPack's TensorRT and OpenCV stay visible)"
    mkdir -p "$OPT"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  elif ! grep -q '^include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    die "$VENV was made without --system-site-packages (JetPack's TensorRT/OpenCV would be invisible): remove it and run again"
  fi
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  index=()
  if [ -n "$WHEELHOUSE" ]; then
    index=(--no-index --find-links "$WHEELHOUSE")
  else
    "${pip[@]}" install --quiet --upgrade pip || warn "could not upgrade pip; continuing with $("${pip[@]}" --version)"
  fi
  if [ -d /usr/local/cuda/bin ]; then PATH=$PATH:/usr/local/cuda/bin; fi # nvcc, for building pycuda
  # The project alone first (no dependencies, so nothing of JetPack's is replaced) ...
  wheel=""
  if [ -n "$WHEELHOUSE" ]; then
    wheel=$(find "$WHEELHOUSE" -maxdepth 1 -name 'daad_inspect-*.whl' | sort -V | tail -n 1)
  fi
  say "virtualenv: installing daad-inspect from ${wheel:-$SRC} (--no-deps)"
  "${pip[@]}" install --quiet "${index[@]}" --no-deps --force-reinstall "${wheel:-$SRC}"
  # ... then only its runtime requirements (core + extras), never opencv or tensorrt: JetPack's
  # OpenCV has GStreamer (pip's has not) and TensorRT must match the L4T release.
  mapfile -t requirements < <("$VENV/bin/python" - "$EXTRAS" <<'PY'
import re
import sys
from importlib.metadata import requires

extras = {e.strip() for e in sys.argv[1].split(",") if e.strip()}
try:
    reqs = requires("daad-inspect")
except Exception:  # Python 3.8's importlib.metadata does not normalise the name
    reqs = requires("daad_inspect")
for req in reqs or []:
    spec, _, marker = req.partition(";")
    wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if wanted and wanted.group(1) not in extras:
        continue
    name = re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0].lower()
    if name.startswith(("opencv", "tensorrt", "daad-inspect")):
        continue
    print(spec.strip() if wanted or not marker.strip() else f"{spec.strip()}; {marker.strip()}")
PY
  )
  [ "${#requirements[@]}" -gt 0 ] || die "could not read daad-inspect's requirements from the venv"
  constraints=()
  if [ "$ON_JETSON" -eq 1 ]; then constraints=(-c "$HERE/constraints-jetson.txt"); fi
  say "virtualenv: runtime requirements (those JetPack already has are kept): ${requirements[*]}"
  "${pip[@]}" install --quiet "${index[@]}" "${constraints[@]}" "${requirements[@]}"
  if [ "$ON_JETSON" -eq 1 ]; then
    pip_cv=$(find "$VENV"/lib/python3*/site-packages -maxdepth 1 -iname 'opencv*' 2>/dev/null | head -n 1)
    [ -z "$pip_cv" ] ||
      die "$pip_cv: pip's OpenCV (no GStreamer) is in the venv and hides JetPack's: '$VENV/bin/pip uninstall opencv-python opencv-python-headless' and run again"
  fi
  "$VENV/bin/python" - <<'PY' || warn "could not report the runtime versions"
def report(name, probe):
    try:
        print(f"install.sh: runtime: {name} {probe()}")
    except Exception as exc:  # absent or broken: say so, the agent falls back or fails clearly
        print(f"install.sh: runtime: {name} not usable ({exc.__class__.__name__}: {exc})")

def cv2_info():
    import cv2
    gst = [l.split(":", 1)[1].strip() for l in cv2.getBuildInformation().splitlines() if "GStreamer" in l]
    return f"{cv2.__version__} from {cv2.__file__} (GStreamer: {gst[0] if gst else 'NO'})"

def trt_info():
    import tensorrt
    return f"{tensorrt.__version__}"

def ort_info():
    import onnxruntime
    return f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}"

report("OpenCV", cv2_info)
report("TensorRT", trt_info)
report("ONNX Runtime", ort_info)
PY
fi

# -- 3. files: helper, docs, units ---------------------------------------------------------------
mkdir -p "$OPT/libexec" "$UNIT_DIR" "$ETC" "$BUNDLES" "$THRESHOLDS_ARCHIVE" "$CACHE"
install -m 0755 "$HERE/daad-build-plan" "$OPT/libexec/daad-build-plan"
install -m 0755 "$HERE/uninstall.sh" "$OPT/uninstall.sh"
install -m 0644 "$HERE/README.md" "$OPT/README.md"
install -m 0644 "$SRC/examples/agent.yaml" "$OPT/agent.yaml.example"
install -m 0644 "$HERE/daad-agent.service" "$HERE/daad-agent@.service" "$UNIT_DIR/"

SYSTEMD_VERSION=${DAAD_SYSTEMD_VERSION:-} # override: tests
if [ -z "$SYSTEMD_VERSION" ] && command -v systemctl >/dev/null 2>&1; then
  SYSTEMD_VERSION=$(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
fi
CREDENTIALS_COMPAT=0
if [ -n "$SYSTEMD_VERSION" ] && [ "$SYSTEMD_VERSION" -lt "$CREDENTIALS_MIN_SYSTEMD" ]; then
  CREDENTIALS_COMPAT=1
fi
for dropins in "$UNIT_DIR/daad-agent.service.d" "$UNIT_DIR/daad-agent@.service.d"; do
  mkdir -p "$dropins"
  {
    echo "# Written by install.sh: the GPU/codec device nodes present on this device at install time"
    echo "# (L4T ${L4T:-none}); see DeviceAllow= in the unit. Rerun install.sh after a JetPack upgrade."
    echo "[Service]"
    for node in "${DEVICE_PATTERNS[@]}"; do
      if [ -c "$node" ]; then echo "DeviceAllow=$node rw"; fi
    done
  } >"$dropins/10-devices.conf"
  chmod 0644 "$dropins/10-devices.conf"
  if [ "$CREDENTIALS_COMPAT" -eq 1 ]; then
    cat >"$dropins/20-credentials-compat.conf" <<'EOF'
# Written by install.sh: this systemd predates LoadCredential= (247). The agent reads the password
# file directly instead: /etc/daad-inspect/credentials is 0750 root:daad, the file 0640 root:daad.
[Service]
Environment=CREDENTIALS_DIRECTORY=/etc/daad-inspect/credentials
EOF
    chmod 0644 "$dropins/20-credentials-compat.conf"
  else
    rm -f "$dropins/20-credentials-compat.conf"
  fi
done
say "units: $UNIT_DIR/daad-agent.service, daad-agent@.service (+ .d/10-devices.conf${SYSTEMD_VERSION:+, systemd $SYSTEMD_VERSION})"

# -- 4. state directories ----------------------------------------------------------------------
# /var/lib/daad-inspect and /var/cache/daad-inspect belong to daad (spool, frames, plans); bundles
# and kept thresholds inside stay root's, read-only to the agent. systemd re-owns a StateDirectory
# recursively only when its top directory has the wrong owner, so this split survives restarts.
chmod 0750 "$STATE"
chmod 0755 "$BUNDLES" "$THRESHOLDS_ARCHIVE"
system chown "$USER_NAME:$USER_NAME" "$STATE" "$CACHE"

# -- 5. bundle ---------------------------------------------------------------------------------
if [ -n "$BUNDLE" ]; then
  id=${BUNDLE_SHA:0:12}
  if [ -d "$BUNDLES/$id" ]; then
    say "bundle: $id already installed in $BUNDLES/$id"
  else
    tmp=$BUNDLES/.$id.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    cp -R "$BUNDLE"/. "$tmp"/
    chmod -R u=rwX,go=rX "$tmp"
    mv -T "$tmp" "$BUNDLES/$id"
    say "bundle: installed $BUNDLE as $BUNDLES/$id"
  fi
  switch_bundle "$id"
fi
if [ -z "$INSTANCE" ]; then
  # examples/agent.yaml reads model.bundle: /var/lib/daad-inspect/bundle
  if [ ! -e "$STATE/bundle" ] || [ -L "$STATE/bundle" ]; then
    ln -sfn bundles/current "$STATE/bundle"
  else
    warn "$STATE/bundle is not a link (a bundle copied by hand?): left alone; point model.bundle at $BUNDLES/current"
  fi
fi

# -- 6. thresholds ---------------------------------------------------------------------------------
current=$(link_target "current$LINK_SUFFIX")
if [ -n "$THRESHOLDS" ]; then
  install -m 0644 "$THRESHOLDS" "$THRESHOLDS_TARGET"
  archive_thresholds "$current"
  say "thresholds: $THRESHOLDS_TARGET (bundle $current)"
fi

# -- 7. config and environment -------------------------------------------------------------------
if [ -e "$CONFIG_TARGET" ] && [ "$FORCE_CONFIG" -eq 0 ]; then
  say "config: keeping $CONFIG_TARGET${CONFIG:+ ($CONFIG not installed: add --force-config to replace it)}"
else
  if [ -z "$CONFIG" ] && [ -n "$INSTANCE" ]; then
    die "--instance $INSTANCE needs --config FILE the first time: each station needs its own paths (systemd/README.md)"
  fi
  if [ -e "$CONFIG_TARGET" ]; then
    backup=$CONFIG_TARGET.bak.$(date +%Y%m%d%H%M%S)
    cp -p "$CONFIG_TARGET" "$backup"
    say "config: previous one kept as $backup"
  fi
  install -m 0644 "${CONFIG:-$SRC/examples/agent.yaml}" "$CONFIG_TARGET"
  say "config: $CONFIG_TARGET (from ${CONFIG:-examples/agent.yaml}); check it with: /opt/daad-inspect/venv/bin/daad-agent --config ${CONFIG_TARGET#"$PREFIX"} --check-config"
fi
if [ -n "$STATION" ]; then
  if [ -f "$ENV_FILE" ] && grep -q '^DAAD_STATION=' "$ENV_FILE"; then
    sed -i "s/^DAAD_STATION=.*/DAAD_STATION=$STATION/" "$ENV_FILE"
  else
    echo "DAAD_STATION=$STATION" >>"$ENV_FILE"
  fi
  chmod 0644 "$ENV_FILE"
  say "station: $STATION ($ENV_FILE)"
fi

# -- 8. MQTT password (systemd credential) ----------------------------------------------------------
CRED=$CRED_DIR/mqtt-password
mkdir -p "$CRED_DIR"
if [ -n "$MQTT_PASSWORD_FILE" ]; then
  (
    umask 077
    if [ "$MQTT_PASSWORD_FILE" = - ]; then cat >"$CRED.tmp"; else cat "$MQTT_PASSWORD_FILE" >"$CRED.tmp"; fi
  )
  [ -s "$CRED.tmp" ] || {
    rm -f "$CRED.tmp"
    die "the MQTT password given is empty"
  }
  mv -f "$CRED.tmp" "$CRED"
  say "mqtt password: $CRED; agent.yaml reads it with mqtt.username set and password_file: \${CREDENTIALS_DIRECTORY}/mqtt-password"
elif [ ! -e "$CRED" ]; then
  # LoadCredential= fails the start when its file is missing: an empty one stands for "no password".
  install -m 0600 /dev/null "$CRED"
fi
if [ "$CREDENTIALS_COMPAT" -eq 1 ]; then
  chmod 0750 "$CRED_DIR"
  chmod 0640 "$CRED"
  system chgrp "$USER_NAME" "$CRED_DIR" "$CRED"
else
  chmod 0700 "$CRED_DIR"
  chmod 0600 "$CRED"
fi

# -- 9. check and start --------------------------------------------------------------------------------
ready=1
if [ -z "$current" ]; then
  warn "no bundle installed yet: run again with --bundle DIR"
  ready=0
elif [ ! -f "$THRESHOLDS_TARGET" ]; then
  warn "no thresholds for bundle $current yet: calibrate on site (systemd/README.md, Recalibrating), then run again with --thresholds FILE"
  ready=0
elif ! thresholds_fit "$THRESHOLDS_TARGET" "$BUNDLES/$current"; then
  warn "$THRESHOLDS_TARGET was made for another bundle than $current, which the agent refuses: calibrate on site (systemd/README.md, Recalibrating), then run again with --thresholds FILE"
  ready=0
fi
if [ "$ready" -eq 1 ] && [ "$STAGED" -eq 0 ] && [ -x "$VENV/bin/daad-agent" ]; then
  station=${INSTANCE:-$STATION}
  if [ -z "$station" ] && [ -f "$ENV_FILE" ]; then station=$(sed -n 's/^DAAD_STATION=//p' "$ENV_FILE" | tail -n 1); fi
  say "checking the config as the service will read it"
  if ! DAAD_STATION=${station:-$(hostname)} CREDENTIALS_DIRECTORY=$CRED_DIR \
    "$VENV/bin/daad-agent" --config "$CONFIG_TARGET" --check-config; then
    die "the agent refuses $CONFIG_TARGET (above): fix it, then run install.sh again (or: systemctl enable --now $UNIT)"
  fi
fi

if [ "$STAGED" -eq 0 ] && [ "$HAVE_SYSTEMCTL" -eq 0 ]; then
  warn "systemctl not found: units installed but not enabled"
else
  system systemctl daemon-reload
  if [ "$ready" -eq 0 ]; then
    say "$UNIT not enabled or restarted (an agent already running keeps its model until it restarts); when the above is done: systemctl enable --now $UNIT"
  else
    system systemctl enable "$UNIT"
    if [ "$NO_START" -eq 1 ]; then
      say "$UNIT enabled, not started (--no-start): systemctl start $UNIT"
    else
      system systemctl restart --no-block "$UNIT"
      [ "$STAGED" -eq 1 ] || say "$UNIT (re)started; follow it with: journalctl -u $UNIT -f"
    fi
  fi
fi
say "done${PREFIX:+ (staging tree $PREFIX)}"
