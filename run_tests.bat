@echo off
rem Windows entry point: the same checks as ./run_tests, on Python 3.9 to 3.13 found the way Windows
rem installs it: "python" on PATH, else the py launcher's newest Python 3. Arguments are passed on
rem and the exit code is run_tests's.
setlocal
cd /d "%~dp0"
where python >nul 2>nul
if errorlevel 1 goto launcher
python run_tests %*
goto done
:launcher
py -3 run_tests %*
:done
exit /b %ERRORLEVEL%
