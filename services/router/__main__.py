from services.mesh import main

main("router")
