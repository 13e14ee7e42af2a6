from sublearn.cli import main

if __name__ == "__main__":  # worker processes (the transfer study's) import this module too
    raise SystemExit(main())
