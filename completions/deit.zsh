#compdef deit

_deit_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _DEIT_COMPLETE=complete_zsh deit)
}

compdef _deit_completion deit
