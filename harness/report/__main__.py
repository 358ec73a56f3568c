from harness.report.build import main

main()
