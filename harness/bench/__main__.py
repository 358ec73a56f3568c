from harness.bench.run import main

main()
