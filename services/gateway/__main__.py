from services.mesh import main

main("gateway")
