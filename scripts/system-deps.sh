#!/usr/bin/env bash
# System packages the GUI tests need: Xvfb (a virtual display, started by pytest-xvfb) and the
# X11 libraries Qt's xcb platform plugin loads. Used by scripts/install.sh and scripts/test.sh.
#
# Installs what is missing with apt-get when running as root (or with a password-less sudo);
# otherwise prints one line naming what to install and exits 1. It never stops the caller:
# without these packages the GUI tests are skipped with that reason (tests/gui/conftest.py),
# the rest of the suite runs. STEM_STRAIN_NO_APT=1 never runs apt-get (only reports).
set -uo pipefail

PKGS=(xvfb libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
      libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0
      libdbus-1-3 libgl1 libegl1)

[ "$(uname -s)" = Linux ] || exit 0    # macOS / Windows: Qt uses the native display

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
elif ! command -v Xvfb >/dev/null 2>&1; then
    echo "scripts/system-deps.sh: GUI tests need Xvfb and Qt's X11 (xcb) libraries; install" \
         "Xvfb with your system's package manager (GUI tests are skipped until then)" >&2
    exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ -n "${STEM_STRAIN_NO_APT:-}" ]; then
    SUDO=(none)
elif [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    SUDO=(none)
fi
if [ "${SUDO[*]}" = none ]; then
    echo "scripts/system-deps.sh: GUI tests need system packages that are missing; as root run:" \
         "apt-get install ${missing[*]} (GUI tests are skipped until then)" >&2
    exit 1
fi

echo "scripts/system-deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${SUDO[@]}" apt-get update -qq && \
       "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null; then
    echo "scripts/system-deps.sh: apt-get could not install ${missing[*]}" \
         "(GUI tests are skipped until they are installed)" >&2
    exit 1
fi
