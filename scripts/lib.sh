# Shared by scripts/*: install what Canal needs on Debian, idempotently.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CANAL_VENV:-$REPO/.venv}"

# What the test bed (tests/testbed) needs on the machine: scripts/test and bench/report install it.
TESTBED_PACKAGES=(docker.io docker-compose containerd runc iptables ipset iproute2 iputils-ping conntrack busybox-static
    docker-registry debootstrap etcd-server etcd-client iperf3 util-linux kmod ca-certificates openssl
    wireguard-go wireguard-tools tcpdump)

say() { printf '%s\n' "canal: $*" >&2; }

need_root() {
    [ "$(id -u)" = 0 ] || { say "run this as root (it installs packages and programs the kernel)"; exit 1; }
}

# apt_install PKG... : install the Debian packages that are missing, nothing else.
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    if [ -z "${CANAL_APT_UPDATED:-}" ]; then
        apt-get update -qq
        export CANAL_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_venv [EXTRAS] : a virtualenv with Canal installed (editable) plus EXTRAS.
ensure_venv() {
    local extras="${1:-}"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3 python3-venv python3-pip
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.canal-installed$extras"
    if [ ! -f "$stamp" ] || [ "$REPO/setup.py" -nt "$stamp" ]; then
        say "installing Canal and its Python dependencies into $VENV"
        local log="$VENV/pip.log"
        if ! { "$VENV/bin/pip" install -q --upgrade pip && "$VENV/bin/pip" install -q -e "$REPO$extras"; } >"$log" 2>&1; then
            cat "$log" >&2
            say "pip install failed (log above)"
            exit 1
        fi
        touch "$stamp"
    fi
}
