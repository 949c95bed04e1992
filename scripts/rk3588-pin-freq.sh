#!/bin/sh
# rk3588-pin-freq.sh - pin the RK3588 CPU, NPU and DDR clocks to their maximum, and put them back.
#
#   rk3588-pin-freq.sh pin       save the current governors/frequencies, then pin everything to max (root)
#   rk3588-pin-freq.sh restore   write the saved governors/frequencies back (root)
#   rk3588-pin-freq.sh status    print the current values (no root needed)
#
# Why: on-demand governors ramp the clocks only after load appears, which adds latency to the first
# tokens and noise to benchmarks. Rockchip's own rknn-llm scripts/fix_freq_rk3588.sh pins them the same way.
#
# Only these sysfs files are ever written; they are the ones documented in shared/knowledge/boards.md:
#   section 4 (CPU, rk3588-base.dtsi): cpu0-3 (Cortex-A55) = cpufreq policy0, cpu4-5 = policy4,
#     cpu6-7 = policy6 (the four A76 cores are two policies), each with scaling_governor,
#     scaling_setspeed, scaling_available_frequencies and scaling_cur_freq.
#   section 5 (vendor rknpu driver): NPU devfreq /sys/class/devfreq/fdab0000.npu and DDR devfreq
#     /sys/class/devfreq/dmc, each with governor, userspace/set_freq, available_frequencies, cur_freq.
#     The NPU node does not exist on mainline (rocket) kernels: rocket has no devfreq code.
# Not touched (boards.md lists them too): the GPU devfreq node (the LLM runs on the NPU) and cpuidle
# state1 (Rockchip's script disables it; that costs idle power for a small latency gain).
#
# CPUs get the "performance" governor (fallback: "userspace" at the highest available frequency).
# Devfreq nodes get "userspace" at the highest available frequency, as Rockchip's script does
# (fallback: "performance").
#
# The state file (default /run/rkedge-freq.state, override with RKEDGE_FREQ_STATE) holds "PATH VALUE"
# lines. A second "pin" keeps the state saved by the first, so "restore" always returns to the values
# from before the first pin. /run is a tmpfs: a reboot resets both the clocks and the state.

set -eu

STATE=${RKEDGE_FREQ_STATE:-/run/rkedge-freq.state}
# RKEDGE_SYSFS_ROOT: a folder standing in for / (tests run the script on a fixture tree, without root).
SYSFS_ROOT=${RKEDGE_SYSFS_ROOT:-}
CPUFREQ=$SYSFS_ROOT/sys/devices/system/cpu/cpufreq
POLICIES="policy0 policy4 policy6"
NPU_DEVFREQ=$SYSFS_ROOT/sys/class/devfreq/fdab0000.npu
DMC_DEVFREQ=$SYSFS_ROOT/sys/class/devfreq/dmc
PROG=$(basename "$0")

say() { printf '%s\n' "$*"; }
warn() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { warn "$*"; exit 1; }

usage() {
    cat <<EOF
usage: $PROG pin|restore|status

  pin      save current governors/frequencies to $STATE, then pin CPU (policy0/4/6),
           NPU devfreq and DDR (dmc) devfreq to their maximum (root)
  restore  write the saved values back and remove the state file (root)
  status   print current governors and frequencies
EOF
}

need_root() {
    [ -n "$SYSFS_ROOT" ] || [ "$(id -u)" -eq 0 ] || die "'$1' writes sysfs and must run as root (try: sudo $0 $1)"
}

# read FILE: its content on one line, or "?" when unreadable.
read_value() {
    _rv=$(cat "$1" 2>/dev/null) || _rv="?"
    printf '%s' "$_rv" | tr '\n' ' ' | sed 's/ *$//'
}

# max_freq FILE: the largest number in a space-separated frequency list (empty when none).
max_freq() {
    tr ' ' '\n' 2>/dev/null < "$1" | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true
}

# write_value VALUE FILE: 0 on success; sysfs rejects bad values with EINVAL, which is reported.
write_value() {
    if ( printf '%s\n' "$1" > "$2" ) 2>/dev/null; then
        return 0
    fi
    warn "could not write '$1' to $2"
    return 1
}

# Only files this script documents may be replayed from the state file.
allowed_path() {
    case $1 in
        "$CPUFREQ"/policy[046]/scaling_governor | "$CPUFREQ"/policy[046]/scaling_setspeed) return 0 ;;
        "$NPU_DEVFREQ"/governor | "$NPU_DEVFREQ"/userspace/set_freq) return 0 ;;
        "$DMC_DEVFREQ"/governor | "$DMC_DEVFREQ"/userspace/set_freq) return 0 ;;
    esac
    return 1
}

missing_note() {
    case $1 in
        "$NPU_DEVFREQ") say "  missing: $1 (no vendor rknpu devfreq: mainline rocket kernel, or rknpu not loaded)" ;;
        "$DMC_DEVFREQ") say "  missing: $1 (this kernel exposes no DDR devfreq node)" ;;
        *) say "  missing: $1" ;;
    esac
}

# save_governor STATE_FILE GOVERNOR CUR_FREQ SET_FREQ: records a governor, and under userspace the frequency it
# holds (restored through SET_FREQ).
save_governor() {
    [ -r "$2" ] || return 0
    governor=$(read_value "$2")
    printf '%s %s\n' "$2" "$governor" >> "$1"
    if [ "$governor" = userspace ] && [ -r "$3" ]; then
        printf '%s %s\n' "$4" "$(read_value "$3")" >> "$1"
    fi
}

save_state() {
    if [ -e "$STATE" ]; then
        say "state already saved in $STATE (from an earlier pin); keeping it"
        return 0
    fi
    tmp="$STATE.tmp.$$"
    (
        umask 077
        : > "$tmp"
        for policy in $POLICIES; do
            save_governor "$tmp" "$CPUFREQ/$policy/scaling_governor" "$CPUFREQ/$policy/scaling_cur_freq" \
                "$CPUFREQ/$policy/scaling_setspeed"
        done
        for dir in "$NPU_DEVFREQ" "$DMC_DEVFREQ"; do
            save_governor "$tmp" "$dir/governor" "$dir/cur_freq" "$dir/userspace/set_freq"
        done
    ) || { rm -f "$tmp"; die "could not write the state file $tmp"; }
    mv -f "$tmp" "$STATE" || { rm -f "$tmp"; die "could not create $STATE"; }
    say "saved current values to $STATE"
}

pin_cpu() {
    failed=0
    for policy in $POLICIES; do
        dir="$CPUFREQ/$policy"
        if [ ! -e "$dir/scaling_governor" ]; then
            missing_note "$dir"
            continue
        fi
        if write_value performance "$dir/scaling_governor"; then
            say "  $policy: governor performance, now $(read_value "$dir/scaling_cur_freq") kHz"
            continue
        fi
        max=$(max_freq "$dir/scaling_available_frequencies")
        if [ -n "$max" ] && [ -e "$dir/scaling_setspeed" ] \
            && write_value userspace "$dir/scaling_governor" && write_value "$max" "$dir/scaling_setspeed"; then
            say "  $policy: governor userspace at $max kHz"
        else
            warn "$policy: could not pin (no performance governor, and userspace at max failed)"
            failed=1
        fi
    done
    return "$failed"
}

pin_devfreq() {
    dir=$1
    if [ ! -e "$dir/governor" ]; then
        missing_note "$dir"
        return 0
    fi
    max=$(max_freq "$dir/available_frequencies")
    if [ -n "$max" ] && [ -e "$dir/userspace/set_freq" ] \
        && write_value userspace "$dir/governor" && write_value "$max" "$dir/userspace/set_freq"; then
        say "  $(basename "$dir"): governor userspace at $max Hz, now $(read_value "$dir/cur_freq") Hz"
        return 0
    fi
    if write_value performance "$dir/governor"; then
        say "  $(basename "$dir"): governor performance, now $(read_value "$dir/cur_freq") Hz"
        return 0
    fi
    warn "$(basename "$dir"): could not pin (neither userspace at max nor performance was accepted)"
    return 1
}

do_pin() {
    need_root pin
    save_state
    failed=0
    say "CPU:"
    pin_cpu || failed=1
    say "NPU / DDR devfreq:"
    pin_devfreq "$NPU_DEVFREQ" || failed=1
    pin_devfreq "$DMC_DEVFREQ" || failed=1
    [ "$failed" -eq 0 ] || die "some clocks could not be pinned (see above); '$PROG restore' puts back what changed"
    say "pinned; undo with: $PROG restore"
}

do_restore() {
    need_root restore
    if [ ! -e "$STATE" ]; then
        say "no saved state in $STATE: nothing to restore"
        return 0
    fi
    failed=0
    while read -r path value; do
        [ -n "${path:-}" ] || continue
        if ! allowed_path "$path"; then
            warn "ignoring unexpected path in $STATE: $path"
            failed=1
            continue
        fi
        if [ ! -e "$path" ]; then
            missing_note "$path"
            continue
        fi
        if write_value "$value" "$path"; then
            say "  $path = $value"
        else
            failed=1
        fi
    done < "$STATE"
    [ "$failed" -eq 0 ] || die "some values could not be restored; $STATE is kept"
    rm -f "$STATE"
    say "restored"
}

do_status() {
    say "CPU (kHz):"
    for policy in $POLICIES; do
        dir="$CPUFREQ/$policy"
        if [ ! -e "$dir/scaling_governor" ]; then
            missing_note "$dir"
            continue
        fi
        say "  $policy: governor $(read_value "$dir/scaling_governor"), cur $(read_value "$dir/scaling_cur_freq"), max available $(max_freq "$dir/scaling_available_frequencies")"
    done
    say "devfreq (Hz):"
    for dir in "$NPU_DEVFREQ" "$DMC_DEVFREQ"; do
        if [ ! -e "$dir/governor" ]; then
            missing_note "$dir"
            continue
        fi
        say "  $(basename "$dir"): governor $(read_value "$dir/governor"), cur $(read_value "$dir/cur_freq"), max available $(max_freq "$dir/available_frequencies")"
    done
    say "rknpu driver:"
    if [ -r /sys/module/rknpu/version ]; then
        say "  /sys/module/rknpu/version: $(read_value /sys/module/rknpu/version)"
    else
        say "  missing: /sys/module/rknpu/version (vendor rknpu driver not present)"
    fi
    if [ -r /sys/kernel/debug/rknpu/load ]; then
        say "  $(read_value /sys/kernel/debug/rknpu/load)"
    fi
    if [ -e "$STATE" ]; then
        say "saved state: $STATE (clocks pinned by this script; undo with '$PROG restore')"
    else
        say "saved state: none"
    fi
}

[ $# -eq 1 ] || { usage >&2; exit 2; }
case $1 in
    pin) do_pin ;;
    restore) do_restore ;;
    status) do_status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
