# Sourced by the HTTP benchmarks. `phase_cpu PID` prints the CPU seconds (user + system)
# each kind of server thread used since the previous call, summed over threads of one
# name: a phase's cost per request, steadier than its rate on a noisy machine.
_phase_cpu_last=""
phase_cpu() {
  local tick now
  tick=$(getconf CLK_TCK)
  now=$(for stat in /proc/"$1"/task/*/stat; do
    # The name is in parentheses and may hold spaces; the fields after it are fixed.
    sed -E 's/^[0-9]+ \((.*)\) (.*)$/\1|\2/' "$stat" 2>/dev/null
  done | awk -F'|' '{ split($2, f, " "); cpu[$1] += f[12] + f[13] } END { for (n in cpu) print n "|" cpu[n] }')
  printf '%s\n--\n%s\n' "$_phase_cpu_last" "$now" | awk -F'|' -v tick="$tick" '
    /^--$/ { after = 1; next }
    NF == 2 { if (after) now[$1] = $2; else before[$1] = $2 }
    END { total = 0; line = ""
      for (n in now) { d = (now[n] - before[n]) / tick; total += d; if (d >= 0.01) line = line sprintf(" %s=%.2f", n, d) }
      printf "   server CPU s: total=%.2f%s\n", total, line }'
  _phase_cpu_last=$now
}
