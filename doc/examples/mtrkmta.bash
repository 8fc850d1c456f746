# bash completion for mtrkmta: its commands, their subcommands and their options.
#
# Install:  cp mtrkmta.bash /usr/share/bash-completion/completions/mtrkmta
# or, for one user, add to ~/.bashrc:  source /path/to/mtrkmta.bash
#
# The words come from `mtrkmta --help` and `mtrkmta COMMAND --help`, asked once per
# shell, so they are those of the mtrkmta installed. After an option that takes a value
# (shown as --option= in the help), file names are completed.

declare -gA _mtrkmta_help_cache

# The help text of `mtrkmta $1` ($1 empty: of mtrkmta itself), asked once per shell.
_mtrkmta_help() {
    local key="mtrkmta $1"
    if [[ -z ${_mtrkmta_help_cache[$key]+set} ]]; then
        # shellcheck disable=SC2086  # $1 is one word or none
        _mtrkmta_help_cache[$key]=$(command mtrkmta $1 --help 2>/dev/null)
    fi
    printf '%s\n' "${_mtrkmta_help_cache[$key]}"
}

# The commands (subcommands) that the help of `mtrkmta $1` lists under "Commands:".
_mtrkmta_commands() {
    _mtrkmta_help "$1" | awk '/^[Cc]ommands:$/ { listed = 1; next } listed && /^  [a-z]/ && !seen[$1]++ { print $1 }'
}

# The long options of `mtrkmta $1`, those taking a value ending in "=".
_mtrkmta_options() {
    _mtrkmta_help "$1" | awk '/^ +(-[A-Za-z], )?--[a-z]/ {
        for (i = 1; i <= NF; i++) if ($i ~ /^--[a-z]/) { print $i; break }
    }'
}

_mtrkmta() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    COMPREPLY=()
    if ((COMP_CWORD == 1)); then
        mapfile -t COMPREPLY < <(compgen -W "$(_mtrkmta_commands "") --help --version" -- "$cur")
        return
    fi
    local command=${COMP_WORDS[1]} options
    options=$(_mtrkmta_options "$command")
    if [[ $prev == --* ]] && grep -qx -- "$prev=" <<<"$options"; then
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        return
    fi
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "${options//=/}" -- "$cur")
        return
    fi
    local subcommands word i
    subcommands=$(_mtrkmta_commands "$command")
    for ((i = 2; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if grep -qx -- "$word" <<<"$subcommands"; then
            subcommands=""  # given already: complete its arguments, file names
            break
        fi
    done
    if [[ -n $subcommands ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$subcommands" -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    fi
}

complete -F _mtrkmta mtrkmta
