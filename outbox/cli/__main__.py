from outbox.console import main

main()
