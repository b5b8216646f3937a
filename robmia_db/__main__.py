from robmia_db.cli import main

main()
