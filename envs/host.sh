# Host helpers shared by the nested test environments (sourced by bash scripts):
# envs/x86-linux-kvm/run.sh and plugins/armv8/env/run-arm64-kvm.sh. Both need root.

# host_mirror SUITE: the Debian mirror the host's own apt uses for SUITE's main component,
# as apt itself resolves its configuration (one-line and deb822 sources alike), so a run
# follows the host's mirror or proxy and the repository names none. KVMFW_DEBIAN_MIRROR
# overrides. Prints nothing when apt knows no Debian mirror.
host_mirror() {
  if [ -n "${KVMFW_DEBIAN_MIRROR:-}" ]; then
    echo "$KVMFW_DEBIAN_MIRROR"
    return
  fi
  local targets
  targets=$(apt-get indextargets --format '$(RELEASE) $(COMPONENT) $(REPO_URI)' \
              'Identifier: Packages' 2>/dev/null | sort -u)
  # the suite itself first; else any mirror with a plain (not -updates/-security) main
  printf '%s\n' "$targets" | awk -v s="$1" '$1 == s && $2 == "main" { print $3; exit }' |
    grep . || printf '%s\n' "$targets" |
    awk '$1 !~ /-/ && $2 == "main" && $3 !~ /security/ { print $3; exit }'
}

# host_pip CACHE: sets HOST_PIP (an array) to a pip for `pip download`. python3's own if it
# has one; else (a tox-uv venv has no pip, nor has Debian's python3 without python3-pip) a
# venv made once under CACHE by python3 -m venv (ensurepip), or by uv venv --seed.
host_pip() {
  if python3 -m pip --version >/dev/null 2>&1; then
    HOST_PIP=(python3 -m pip)
    return 0
  fi
  local v=$1/host-pip
  if ! "$v/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$v"
    python3 -m venv "$v" >/dev/null 2>&1 ||
      { command -v uv >/dev/null && uv venv -q --seed -p python3 "$v" >/dev/null 2>&1; } ||
      return 1
    "$v/bin/python" -m pip --version >/dev/null 2>&1 || return 1
  fi
  HOST_PIP=("$v/bin/python" -m pip)
}
