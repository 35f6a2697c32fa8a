# Sourced by the service scripts: install Debian packages without letting their install
# scripts start services with default configs (the caller starts them its own way).

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    # One `apt-get update` an hour is enough (CI runs several of these scripts in a row).
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null) ]]; then
        apt-get update -qq
    fi
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then  # Docker images usually have this file
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local status=0
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    if (( own_policy )); then rm -f /usr/sbin/policy-rc.d; fi
    return "$status"
}
